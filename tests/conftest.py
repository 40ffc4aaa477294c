"""Shared fixtures: tiny models written to disk in the real formats."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_original(tmp_path_factory) -> Path:
    """The tiny model in the original ACE-Step folder layout (seed 0)."""
    from sidestep_core.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_original"), "original", "tiny", 0).root


@pytest.fixture(scope="session")
def tiny_with_lm(tmp_path_factory):
    """The tiny model in the original layout with the tiny 5 Hz planner LM beside it (a ``TinyCheckpoint``)."""
    from sidestep_core.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_with_lm"), "original", "tiny", 0, lm=True)
