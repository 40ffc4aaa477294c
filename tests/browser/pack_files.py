"""The template generator (tools/generate_pack_files.py), loaded by path for the browser tests. Not a test module."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def generator():
    spec = importlib.util.spec_from_file_location("sidestep_generate_pack_files",
                                                  ROOT / "tools" / "generate_pack_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
