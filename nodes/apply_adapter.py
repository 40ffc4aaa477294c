"""Apply Adapter: patches a ComfyUI MODEL with an adapter through ComfyUI's model patcher.

Before anything is patched, the adapter is checked against the shapes of the connected model with the same core
check ``sidestep export`` runs (ComfyUI itself only fails when it patches the weights, during sampling, and logs
keys it cannot place without failing); what ComfyUI still leaves out is reported in the node's text.

With a CLIP connected, the planner-LM adapter that came with the adapter (a run's ``final/lm``, or
``<lora_name>_lm.safetensors`` beside a file) patches the text encoder's 5 Hz LM through the CLIP's patcher, in the
generic ``text_encoders.*`` keys ComfyUI's LoraLoader uses; an adapter for an LM of another size is refused.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Optional

import comfy.lora
import comfy.utils
import folder_paths
from comfy_api.latest import io

from . import calls, spec as S
from .comfy_glue import dora_base, log, release_memory, text
from .schema import build_schema
from .values import AdapterRef

NOT_LOADED = "lora key not loaded: "  # what comfy.lora.load_lora logs for each key it cannot place


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
                mlp_strength=1.0, adapter: Optional[AdapterRef] = None, checkpoint="final", clip=None,
                lm_strength=1.0) -> io.NodeOutput:
        from sidestep_core.adapters import AdapterFormatError, read_adapter_weights, to_comfyui_state_dict
        from sidestep_core.planner.lm_adapter import LM_FOLDER, has_dit_adapter

        notes: list[str] = []
        lm_source = None
        if adapter is not None:
            chosen = calls.chosen_adapter(adapter, checkpoint)
            lm_source = chosen / LM_FOLDER if (chosen / LM_FOLDER).is_dir() else None
        if adapter is not None and lm_source is not None and not has_dit_adapter(chosen):
            sd, source = None, str(chosen)  # a run that trained the planner LM only
        elif adapter is not None:
            aw = read_adapter_weights(chosen)
            check_fits(model, aw)
            base = dora_base(aw, adapter)
            try:
                sd, notes = to_comfyui_state_dict(aw, base=base)
            finally:
                if base is not None:  # the decoder read for a DoRA conversion
                    base = None
                    release_memory()
            source = str(chosen)
            if lora_name not in ("", S.NONE):
                notes.append(f"lora_name {lora_name!r} ignored: the connected adapter is used")
        elif lora_name not in ("", S.NONE):
            path = folder_paths.get_full_path_or_raise("loras", lora_name)
            sibling = os.path.splitext(path)[0] + "_lm.safetensors"
            lm_source = sibling if os.path.isfile(sibling) else None
            try:
                check_fits(model, read_adapter_weights(path))
            except AdapterFormatError as exc:  # a file the core cannot read: ComfyUI may still apply it
                notes.append(f"not checked against the model ({exc})")
            sd = comfy.utils.load_torch_file(path, safe_load=True)
            source = path
        else:
            raise ValueError("Apply Adapter: connect an adapter or choose a lora_name")
        patched_clip = clip
        if clip is not None and lm_source is not None:
            patched_clip, lm_notes = apply_lm(clip, lm_source, lm_strength)
            notes.extend(lm_notes)
        elif clip is not None:
            notes.append("no planner-LM adapter comes with this adapter: the CLIP passes through unchanged")
        elif lm_source is not None:
            notes.append(f"{lm_source}: a planner-LM adapter is there; connect the CLIP to apply it")
        if sd is None:
            return io.NodeOutput(model, patched_clip, ui=text(f"no DiT adapter in {source}: MODEL unchanged",
                                                              *notes))
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        with logged_unloaded_keys() as unloaded:
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
        left_out = []
        if unloaded:
            left_out.append(f"{len(unloaded)} of {len(sd)} adapter tensor(s) were not loaded by ComfyUI, first: "
                            + ", ".join(unloaded[:3]))
        if missing:
            left_out.append(f"{len(missing)} adapter module(s) not in this model, first: {missing[0]}")
        for line in left_out:
            log.warning("Apply Adapter: %s: only part of the adapter applies: %s", source, line)
        return io.NodeOutput(patched, patched_clip, ui=text(f"applied {len(applied)} modules from {source}",
                                              *(f"warning: only part of the adapter applies: {w}" for w in left_out),
                                              *notes))


def apply_lm(clip, source, strength: float):
    """``(patched CLIP, notes)``: the planner-LM adapter at ``source`` (a PEFT folder written by training, a
    ComfyUI file, or a state dict in ComfyUI's keys: the one training now) on the CLIP's LM through ComfyUI's own
    key map and patcher."""
    from sidestep_core.planner.lm_adapter import check_fits, read_lm_adapter, to_comfyui_lm_state_dict

    te = clip.cond_stage_model
    slot = getattr(te, "lm_model", None)
    lm = getattr(te, slot, None) if slot else None
    if lm is None:
        raise ValueError("Apply Adapter: the connected CLIP has no 5 Hz planner LM (load it with DualCLIPLoader "
                         "type ace: qwen_0.6b_ace15 and qwen_1.7b_ace15 / qwen_4b_ace15)")
    conf = lm.transformer.model.config
    if isinstance(source, dict):
        sd, source = source, "the planner-LM adapter being trained"
    elif os.path.isdir(source):
        saved = read_lm_adapter(source)
        # the width tells the released LMs apart (ComfyUI's config keeps 28/36 layers whatever a file holds)
        check_fits(saved, {"hidden_size": conf.hidden_size, "num_hidden_layers": conf.num_hidden_layers},
                   keys=("hidden_size",))
        sd = to_comfyui_lm_state_dict(saved)
    else:
        sd = comfy.utils.load_torch_file(source, safe_load=True)
    key_map = comfy.lora.model_lora_keys_clip(te, {})
    with logged_unloaded_keys() as unloaded:
        patches = comfy.lora.load_lora(sd, key_map)
    if not patches:
        raise ValueError(f"{source}: no tensor of this LM adapter matches the connected CLIP's LM ({slot}: width "
                         f"{conf.hidden_size}, {conf.num_hidden_layers} layers); it was trained on an LM of another "
                         "size")
    patched = clip.clone()
    applied = set(patched.add_patches(patches, strength))
    notes = [f"planner LM: applied {len(applied)} modules from {source} to {slot}"]
    if unloaded or len(applied) < len(patches):
        left = unloaded or [k for k in patches if k not in applied]
        notes.append(f"warning: only part of the LM adapter applies ({len(left)} left out, first: {left[0]})")
        log.warning("Apply Adapter: %s: %s", source, notes[-1])
    return patched, notes


def check_fits(model, aw) -> None:
    """Raise the core's :class:`AdapterShapeError` (the message ``sidestep export`` shows: which modules, which
    shapes) unless every target of ``aw`` exists in the connected ComfyUI model with a fitting shape."""
    from sidestep_core.adapters.weights import target_shapes

    root = model.model.diffusion_model
    decoder = getattr(root, "decoder", None)
    if decoder is None:
        raise ValueError(f"Apply Adapter: the connected MODEL ({type(model.model).__name__}) is not an ACE-Step 1.5 "
                         "model")
    aw.check_against(target_shapes(decoder), target_shapes(root))


@contextmanager
def logged_unloaded_keys():
    """The keys ComfyUI's ``load_lora`` reports as not loaded (it only logs them)."""
    found: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if msg.startswith(NOT_LOADED):
                found.append(msg[len(NOT_LOADED):])

    handler = Catch(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield found
    finally:
        root.removeHandler(handler)
