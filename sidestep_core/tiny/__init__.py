"""Tiny deterministic ACE-Step 1.5 checkpoints in the real on-disk formats (tests and the demo's default model).

The names are plain constants here and the writers load on first use, so the CLI's parser imports no torch."""

from importlib import import_module

LAYOUTS = ("original", "comfyui-split", "comfyui-aio")
PROFILES = ("tiny", "tiny-xl", "comfyui-min")

_LAZY = {"TinyCheckpoint": "writer", "make_tiny_checkpoint": "writer", "get_profile": "profiles"}

__all__ = ["LAYOUTS", "PROFILES", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
