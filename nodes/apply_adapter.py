"""Apply Adapter: patches a ComfyUI MODEL with an adapter through ComfyUI's model patcher."""

from __future__ import annotations

import os
from typing import Optional

import comfy.lora
import comfy.utils
import folder_paths
from comfy_api.latest import io

from . import calls, spec as S
from .comfy_glue import dora_base, text
from .schema import build_schema
from .values import AdapterRef


class ApplyAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(S.APPLY)

    @classmethod
    def fingerprint_inputs(cls, model=None, lora_name=S.NONE, **_):
        if lora_name in ("", S.NONE):
            return ""
        path = folder_paths.get_full_path("loras", lora_name)
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        return f"{lora_name}:{st.st_size}:{st.st_mtime_ns}" if st else lora_name

    @classmethod
    def execute(cls, model, lora_name=S.NONE, strength=1.0, self_attn_strength=1.0, cross_attn_strength=1.0,
                mlp_strength=1.0, adapter: Optional[AdapterRef] = None, checkpoint="final") -> io.NodeOutput:
        from sidestep_core.adapters import read_adapter_weights, to_comfyui_state_dict

        notes: list[str] = []
        if adapter is not None:
            chosen = calls.chosen_adapter(adapter, checkpoint)
            aw = read_adapter_weights(chosen)
            sd, notes = to_comfyui_state_dict(aw, base=dora_base(aw, adapter))
            source = str(chosen)
            if lora_name not in ("", S.NONE):
                notes.append(f"lora_name {lora_name!r} ignored: the connected adapter is used")
        elif lora_name not in ("", S.NONE):
            path = folder_paths.get_full_path_or_raise("loras", lora_name)
            sd = comfy.utils.load_torch_file(path, safe_load=True)
            source = path
        else:
            raise ValueError("Apply Adapter: connect an adapter or choose a lora_name")
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        patches = comfy.lora.load_lora(sd, key_map)
        if not patches:
            raise ValueError(f"{source}: no tensor of this adapter matches the model (is it an ACE-Step 1.5 "
                             f"adapter?)")
        groups = {"self_attn_strength": self_attn_strength, "cross_attn_strength": cross_attn_strength,
                  "mlp_strength": mlp_strength}
        patched = model.clone()
        applied: set = set()
        for value, part in calls.group_strengths(patches, strength, groups).items():
            applied.update(patched.add_patches(part, value))
        missing = [k for k in patches if k not in applied]
        if missing:
            notes.append(f"{len(missing)} adapter module(s) not in this model, first: {missing[0]}")
        return io.NodeOutput(patched, ui=text(f"applied {len(applied)} modules from {source}", *notes))
