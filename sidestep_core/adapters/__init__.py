"""Adapter files: read every format users have into one in-memory form, compute merged weights, export to ComfyUI,
and apply adapters to the core model.

- ``weights``: :class:`AdapterWeights` / :class:`ModuleWeights`, the common in-memory form (decoder naming).
- ``formats``: detect and read PEFT folders, LyCORIS files and ComfyUI-format files.
- ``delta``: the maths of each adapter type (merged weight W' from base weight W).
- ``comfy_export``: write one ``.safetensors`` that stock ComfyUI applies exactly.
- ``upstream``: what upstream ACE-Step's own loader reads: ``lokr_config`` metadata, PEFT folders (``export_peft``).
- ``diffusers_format``: one file for diffusers' ``AceStepPipeline.load_lora_weights``, and its module names.
- ``merge``: the exact weighted sum of adapters as one adapter (and optional SVD re-ranking, its error stated).
- ``bake``: adapters applied to a copy of the base model, written tensor by tensor as a ComfyUI diffusion model.
- ``apply``: merge / unmerge / unmerged (hooked) application to the core decoder at a strength.
- ``convert``: back to the trainer's settings and keys, to continue training an adapter read from any file.
"""

from .weights import AdapterFormatError, AdapterShapeError, AdapterWeights, ModuleWeights
from .formats import detect_format, read_adapter_weights
from .delta import delta_weight, merged_weight
from .comfy_export import export_comfyui, to_comfyui_state_dict
from .upstream import export_peft
from .convert import to_trainer_state_dict, trainer_settings
from .apply import AppliedAdapter, MergedAdapter, apply_unmerged, merge_adapter, merged_state, unmerge_adapter

__all__ = [
    "AdapterFormatError", "AdapterShapeError", "AdapterWeights", "AppliedAdapter", "MergedAdapter", "ModuleWeights",
    "apply_unmerged", "delta_weight", "detect_format", "export_comfyui", "export_peft", "merge_adapter",
    "merged_weight", "merged_state", "read_adapter_weights", "to_comfyui_state_dict", "to_trainer_state_dict",
    "trainer_settings", "unmerge_adapter",
]
