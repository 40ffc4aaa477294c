"""CLI subcommands; each module exposes ``register(subparsers, name)`` and ``run(args) -> int``."""
