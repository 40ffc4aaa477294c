"""ComfyUI in-process, for tests that check our files against ComfyUI itself.

Runs only when ``COMFYUI_DIR`` points at a ComfyUI checkout, e.g.::

    COMFYUI_DIR=/path/to/ComfyUI python -m pytest tests/comfyui -q

The ``comfy`` fixture imports ComfyUI once per session with ``args.cpu = True`` and returns its modules. When
torchvision or torchaudio are not installed (ComfyUI imports them at start-up, though nothing ACE-Step uses needs
them), import stand-ins are generated into a temporary folder; calling anything in them raises.
"""

from __future__ import annotations

import copy
import os
import sys
import types
from pathlib import Path

import pytest

import comfy_harness as H

COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
SKIP_REASON = ("COMFYUI_DIR is not set: these tests import ComfyUI from a checkout "
               "(COMFYUI_DIR=/path/to/ComfyUI python -m pytest tests/comfyui)")


def pytest_collection_modifyitems(config, items):
    if COMFYUI_DIR:
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    H.fail_skips_in_ci(item, outcome.get_result(), Path(__file__).parent)


_FOLDERS_AT_IMPORT: dict = {}  # ComfyUI's model folders as it set them up, before any test added its own


@pytest.fixture(autouse=True, scope="module")
def _own_model_folders():
    """A test module's ``folder_paths.add_model_folder_path`` calls end with it: ComfyUI keeps them process-wide, and
    a model folder one module registers (an LM in text_encoders, say) must not change what the next one finds."""
    yield
    folder_paths = sys.modules.get("folder_paths")
    if folder_paths is not None and _FOLDERS_AT_IMPORT:
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update(copy.deepcopy(_FOLDERS_AT_IMPORT))
        folder_paths.filename_list_cache.clear()


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI's modules, imported in-process on the CPU: ``comfy.sd``, ``comfy.lora``, ``comfy.utils``, … plus
    ``dir`` (the checkout), ``standins`` (packages replaced by import stand-ins) and ``standin_dir`` (the folder
    holding them, to put on a ComfyUI subprocess's PYTHONPATH; None when nothing is stood in)."""
    if not COMFYUI_DIR:
        pytest.skip(SKIP_REASON)
    root = Path(COMFYUI_DIR).expanduser().resolve()
    if not (root / "comfy" / "sd.py").is_file():
        pytest.fail(f"COMFYUI_DIR={COMFYUI_DIR}: not a ComfyUI checkout (comfy/sd.py missing)")
    standin_dir = tmp_path_factory.mktemp("comfy_standins")
    standins = H.write_standins(standin_dir)
    if standins:
        sys.path.insert(0, str(standin_dir))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args  # never call enable_args_parsing(): it would parse pytest's argv

    args.cpu = True  # before anything imports comfy.model_management
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import comfy.weight_adapter
    import folder_paths

    _FOLDERS_AT_IMPORT.update(copy.deepcopy(folder_paths.folder_names_and_paths))
    return types.SimpleNamespace(
        dir=root, standins=standins, standin_dir=standin_dir if standins else None,  # for ComfyUI subprocesses
        sd=comfy.sd, lora=comfy.lora, utils=comfy.utils,
        model_management=comfy.model_management, weight_adapter=comfy.weight_adapter,
    )
