"""Tiny deterministic ACE-Step 1.5 checkpoints in the real on-disk formats (tests and the demo's default model)."""

from .profiles import PROFILES, get_profile
from .writer import LAYOUTS, TinyCheckpoint, make_tiny_checkpoint

__all__ = ["LAYOUTS", "PROFILES", "TinyCheckpoint", "get_profile", "make_tiny_checkpoint"]
