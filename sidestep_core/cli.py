"""``sidestep`` command line: one subcommand per module in ``sidestep_core.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

from . import LOG_SHOWN, __version__
from .fsutil import os_error_message

# Subcommand name -> module in sidestep_core.commands exposing register(subparsers) and run(args) -> int.
COMMANDS = {
    "demo": "demo",
    "make-tiny-checkpoint": "make_tiny",
    "preprocess": "preprocess",
    "train": "train",
    "estimate": "estimate",
    "export": "export",
    "merge": "merge",
    "presets": "presets",
    "generate": "generate",
    "compare": "generate",
    "plan": "plan",
    "label": "label",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidestep",
        description="Train and apply ACE-Step 1.5 adapters (LoRA, DoRA, LoKR, LoHA, OFT).",
    )
    parser.add_argument("--version", action="version", version=f"sidestep {__version__}")
    parser.add_argument("--plain", action="store_true", help="plain log lines instead of progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"sidestep_core.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"sidestep_core.commands.{module}":
                raise
            continue  # subcommand not built yet
        p = mod.register(sub, name)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _print_warnings()
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ValueError as exc:  # user-facing errors: bad files, bad settings
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `sidestep presets show x | head`: the reader left; nothing to report
        _silence_stdout()
        return 0
    except OSError as exc:  # unreadable input, read-only or full output folder, …: the path and the reason
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return 2


class _WarningsToStderr(logging.Handler):
    """The package's warnings on stderr (the one it is at the time: tests swap it), except those the command's
    progress renderer already printed (``LOG_SHOWN``)."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, LOG_SHOWN, False) and bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _print_warnings() -> None:
    """Installed once: without a handler Python's last-resort one prints every warning, those the progress
    renderer shows a second time."""
    logger = logging.getLogger("sidestep")
    if not any(isinstance(h, _WarningsToStderr) for h in logger.handlers):
        logger.addHandler(_WarningsToStderr())


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
