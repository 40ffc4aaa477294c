"""``comfy_entrypoint``: the Side-Step nodes as ComfyUI V3 nodes, one module each.

Each node's ``execute`` converts ComfyUI values into one ``sidestep_core`` call and back; the schemas come from
``spec.py`` (through ``schema.py``). Everything that trains runs inside ``torch.inference_mode(False)`` (ComfyUI
runs prompts under inference mode) and reports through ComfyUI's progress bar and events for the web extension.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from sidestep_core import __version__

from .apply_adapter import ApplyAdapter
from .comfy_glue import log
from .compare_adapters import CompareAdapters
from .estimate_gradients import EstimateGradients
from .export_adapter import ExportAdapter
from .load_checkpoint import LoadCheckpoint
from .merge_adapters import MergeAdapters
from .preprocess_audio import PreprocessAudio
from .train_adapter import TrainAdapter

NODE_CLASSES = (LoadCheckpoint, PreprocessAudio, TrainAdapter, EstimateGradients, ExportAdapter, ApplyAdapter,
                CompareAdapters, MergeAdapters)


class SideStepExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)


async def comfy_entrypoint() -> SideStepExtension:
    log.info("Side-Step %s: %d nodes", __version__, len(NODE_CLASSES))
    return SideStepExtension()
