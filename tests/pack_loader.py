"""Import the pack's ``nodes`` package under a private name.

The repository root is a ComfyUI custom-node folder whose node package is called ``nodes``, the same name as
ComfyUI's top-level ``nodes`` module. Tests load it as ``sidestep_pack.nodes`` so the two never collide,
whichever of them a test session imported first. Not a test module.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sidestep_pack"


def pack():
    """The repository root as the package ``sidestep_pack`` (what ComfyUI does with a custom-node folder)."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


def pack_module(name: str):
    """``sidestep_pack.nodes.<name>`` (e.g. "spec", "calls", "train_adapter")."""
    pack()
    return importlib.import_module(f"{PACKAGE}.nodes.{name}")
