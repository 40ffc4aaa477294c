"""Export Adapter: writes a trained adapter into ``models/loras`` in ComfyUI's (or PEFT/LyCORIS) key format."""

from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io

from . import calls, spec as S
from .comfy_glue import dora_base, paths, release_memory, text
from .schema import build_schema
from .values import AdapterRef


class ExportAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(S.EXPORT)

    @classmethod
    def fingerprint_inputs(cls, name="sidestep_adapter", directory="", **_):
        """Export again when a file it wrote was deleted or replaced (the trained adapter is not visible here:
        ComfyUI passes only widget values; a new training already invalidates the cache through the link)."""
        root = Path(directory).expanduser() if directory.strip() else Path((paths("loras") or ["."])[0])
        path = calls.export_path(root, name, True)
        return calls.files_state(path, path.with_name(path.stem + "_lm.safetensors"))

    @classmethod
    def execute(cls, adapter: AdapterRef, name="sidestep_adapter", format="comfyui", overwrite=True,
                directory="", checkpoint="final") -> io.NodeOutput:
        from sidestep_core.adapters import export_comfyui, read_adapter_weights
        from sidestep_core.planner.lm_adapter import LM_FOLDER, export_lm_comfyui, has_dit_adapter

        chosen = calls.chosen_adapter(adapter, checkpoint)
        root = Path(directory).expanduser() if directory.strip() else Path(paths("loras")[0])
        lm = chosen / LM_FOLDER if (chosen / LM_FOLDER).is_dir() else None
        if lm is not None and not has_dit_adapter(chosen):  # a run that trained the planner LM only
            path = export_lm_comfyui(lm, calls.export_path(root, f"{name}_lm", bool(overwrite)))
            folder_paths.filename_list_cache.pop("loras", None)
            return io.NodeOutput(str(path), ui=text(f"wrote {path} (planner LM adapter) from {lm}"))
        aw = read_adapter_weights(chosen)
        base = dora_base(aw, adapter)  # PEFT-style DoRA: ComfyUI's dora_scale is relative to the base weights
        try:
            path, notes = export_comfyui(aw, calls.export_path(root, name, bool(overwrite)), base=base,
                                         base_identity=adapter.base_identity, base_variant=adapter.base_variant,
                                         key_style=calls.EXPORT_KEY_STYLES[format])
        finally:
            if base is not None:  # the decoder read for a DoRA conversion
                base = None
                release_memory()
        if lm is not None:  # beside it, named so Apply Adapter (lora_name) finds it for the CLIP
            try:
                lm_path = export_lm_comfyui(lm, path.with_name(path.stem + "_lm.safetensors"))
                notes.append(f"wrote {lm_path} (the planner LM's adapter)")
            except ValueError as exc:
                notes.append(f"planner LM adapter not exported for ComfyUI: {exc}")
        folder_paths.filename_list_cache.pop("loras", None)  # let LoRA loaders list the new file at once
        return io.NodeOutput(str(path), ui=text(f"wrote {path} from {chosen}", *notes))

