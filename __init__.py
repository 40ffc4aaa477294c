"""ComfyUI entry point of the Side-Step node pack (nodes in nodes/; the headless core in sidestep_core/).

ComfyUI imports this folder as a package and calls ``comfy_entrypoint`` (V3 nodes). ``NODE_CLASS_MAPPINGS`` is
deliberately absent: ComfyUI would take the V1 route if it were there. Outside ComfyUI (pytest collecting the
repository, the CLI) importing this file defines only ``WEB_DIRECTORY`` and needs nothing from ComfyUI.
"""

import importlib.util
import os
import sys

WEB_DIRECTORY = "./web"

_HERE = os.path.dirname(os.path.abspath(__file__))


def _running_in_comfyui() -> bool:
    try:
        return importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("folder_paths") is not None
    except (ImportError, ValueError):
        return False


if _running_in_comfyui():
    # The core ships inside the pack: make ``import sidestep_core`` work when the pack was only copied into
    # custom_nodes (an installed copy, e.g. `pip install -e`, is used as it is). Appended, so nothing in this
    # folder can shadow ComfyUI's own top-level modules.
    if importlib.util.find_spec("sidestep_core") is None:
        sys.path.append(_HERE)
    from .nodes.extension import comfy_entrypoint  # noqa: E402

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
else:
    __all__ = ["WEB_DIRECTORY"]
