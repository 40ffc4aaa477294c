"""Adapters for diffusers' ACE-Step 1.5 pipeline (``AceStepPipeline.load_lora_weights``, diffusers >= 0.42).

diffusers names the DiT's modules differently from the released checkpoint (its conversion script renames
``decoder.<x>`` to ``<x>`` with ``proj_in.1`` → ``proj_in_conv``, ``proj_out.1`` → ``proj_out_conv``; its attention
has ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` and ``norm_q`` / ``norm_k``): :func:`diffusers_name` maps a
target, :func:`diffusers_state_dict` a whole DiT state dict.

What its loader does with a file (``AceStepLoraLoaderMixin``, diffusers 0.42.1): keys already named
``transformer.<module>.lora_A/B.weight`` are used as they are (the ``q_proj`` → ``to_q`` renaming of PEFT keys is
applied only when some key contains ``q_proj`` / ``k_proj``, so an MLP-only PEFT file would load nothing); without
diffusers' own ``lora_adapter_metadata`` it builds a LoRA config with alpha = rank for every module (scale 1), and
``dora_scale`` keys are dropped. So :func:`to_diffusers` writes diffusers' key names with each module's scale folded
into ``lora_B`` (exact up to one fp32 rounding), PEFT-style DoRA as ``lora_magnitude_vector`` (PEFT's own DoRA),
LoHa / LoKr through their exact low-rank forms (:func:`.merge.low_rank_factors`), and everything else (OFT, other
DoRA forms, full deltas, and low-rank forms as large as the weight) as a full-rank LoRA of the exact ΔW — for OFT
and non-PEFT DoRA computed on the base model given, so exact only there.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping, Optional

import torch

from .. import __version__
from ..fsutil import atomic_save_file
from .comfy_export import BaseWeights, ExportError, _base_getter
from .delta import delta_weight
from .merge import low_rank_factors
from .names import is_target
from .weights import AdapterFormatError, AdapterShapeError, AdapterWeights, ModuleWeights

PREFIX = "transformer."
_SEGMENTS = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "o_proj": "to_out.0", "q_norm": "norm_q",
             "k_norm": "norm_k"}
_MODULES = {"proj_in.1": "proj_in_conv", "proj_out.1": "proj_out_conv"}


def diffusers_name(target: str) -> str:
    """Decoder target (``layers.0.self_attn.o_proj``) → ``AceStepTransformer1DModel`` module (``…to_out.0``)."""
    for old, new in _MODULES.items():
        if target == old or target.startswith(old + "."):
            target = new + target[len(old):]
    return ".".join(_SEGMENTS.get(s, s) for s in target.split("."))


def target_name(module: str) -> str:
    """The inverse of :func:`diffusers_name`."""
    for old, new in _MODULES.items():
        if module == new or module.startswith(new + "."):
            module = old + module[len(new):]
    module = module.replace("to_out.0", "o_proj")
    back = {v: k for k, v in _SEGMENTS.items()}
    return ".".join(back.get(s, s) for s in module.split("."))


def diffusers_state_dict(dit: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``decoder.*`` tensors of an ACE-Step 1.5 DiT state dict under ``AceStepTransformer1DModel``'s names."""
    out = {}
    for key, value in dit.items():
        if key.startswith("decoder."):
            owner, _, param = key[len("decoder."):].rpartition(".")
            out[f"{diffusers_name(owner)}.{param}" if owner else param] = value
    return out


def _full_rank(dw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A = ΔW exactly, rank min(out, in): the identity on the smaller side."""
    out, inp = dw.shape
    eye = torch.eye(min(out, inp))
    return (eye, dw) if inp <= out else (dw, eye)


def to_diffusers(aw: AdapterWeights, base: Optional[BaseWeights] = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(state dict, notes)`` that diffusers' ACE-Step ``load_lora_weights`` applies as ``aw`` at strength 1."""
    where = aw.source or "adapter"
    if aw.outside:
        raise ExportError(f"{where}: diffusers' ACE-Step LoRA loader adapts the transformer only; this adapter also "
                          f"changes {len(aw.outside)} module(s) outside it (e.g. {next(iter(aw.outside))})")
    get_base = _base_getter(base)
    sd: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    doras = set()
    for name, m in aw.modules.items():
        if m.bias_diff is not None:
            raise ExportError(f"{where}: {name}: bias deltas cannot be written as a diffusers LoRA")
        shape = m.weight_shape()
        if len(shape) != 2:
            raise ExportError(f"{where}: {name}: only linear layers can be written for diffusers")
        key = f"{PREFIX}{diffusers_name(name)}"
        factors = None
        if m.kind == "lora" and m.dora_mode in (None, "row_merged"):
            factors = (m.tensors["down"].float(), m.tensors["up"].float() * m.scale)
            if m.dora is not None:
                sd[f"{key}.lora_magnitude_vector"] = m.dora.float().reshape(-1).contiguous()
        elif m.dora is None and m.kind != "oft":
            low = low_rank_factors(m)
            if low is not None and low[0].shape[1] < min(shape):
                factors = (low[1], low[0])
        if factors is None:
            on_base = m.kind == "oft" or m.dora is not None
            if on_base and get_base is None:
                raise ExportError(f"{where}: writing {m.kind}{' DoRA' if m.dora is not None else ''} for diffusers "
                                  "needs the base model it was trained on (its delta depends on the base weights)")
            weight = get_base(name).float() if on_base else torch.zeros(shape)
            factors = _full_rank(delta_weight(m, weight))
            notes.append(f"{m.kind} modules written as full-rank LoRA deltas"
                         + (", exact for the base model given only" if on_base else ""))
        doras.add(f"{key}.lora_magnitude_vector" in sd)
        sd[f"{key}.lora_A.weight"] = factors[0].contiguous()
        sd[f"{key}.lora_B.weight"] = factors[1].contiguous()
    if len(doras) > 1:
        raise ExportError(f"{where}: mixes DoRA and plain modules, which one diffusers LoRA config cannot describe")
    return sd, sorted(set(notes))


def read_diffusers(path: str | Path) -> AdapterWeights:
    """A diffusers ACE-Step LoRA file (ours, or another tool's) in the common form, scaled as diffusers' loader
    scales it: by the ``lora_adapter_metadata`` it carries (``lora_alpha``, ``alpha_pattern``, ``use_rslora``),
    and by 1 without it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # a truncated file
        raise AdapterFormatError(f"{path}: cannot read adapter tensors ({exc})") from exc
    try:
        conf = _lora_config(meta)
    except (ValueError, AttributeError) as exc:
        raise AdapterFormatError(f"{path}: unreadable lora_adapter_metadata ({exc})") from exc
    modules = {}
    for key in sd:
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX): -len(".lora_A.weight")]
            up = sd.get(f"{PREFIX}{module}.lora_B.weight")
            if up is None:
                raise AdapterFormatError(f"{path}: {key} has no lora_B beside it")
            mag = sd.get(f"{PREFIX}{module}.lora_magnitude_vector")
            mw = ModuleWeights("lora", {"up": up, "down": sd[key]}, dora=mag,
                               dora_mode=None if mag is None else "row_merged")
            mw.check_tensors(f"{path}: {module}")
            rank = mw.rank()
            try:
                mw.alpha = float(_pattern_value(conf.get("alpha_pattern"), module, conf.get("lora_alpha", rank)))
            except (TypeError, ValueError, AttributeError, re.error) as exc:
                raise AdapterFormatError(f"{path}: unreadable lora_adapter_metadata ({exc})") from exc
            if not math.isfinite(mw.alpha):
                raise AdapterFormatError(f"{path}: {module}: alpha is {mw.alpha}")
            mw.scale = mw.alpha / (rank ** 0.5 if conf.get("use_rslora") else rank)
            modules[target_name(module)] = mw
    foreign = [n for n in modules if not is_target(f"decoder.{n}")]
    if foreign or not modules:
        raise AdapterShapeError(f"{path}: a diffusers LoRA for another model ({len(foreign)} of {len(modules)} modules "
                                f"are not in ACE-Step 1.5's transformer, first: {', '.join(foreign[:3])})" if modules
                                else f"{path}: a diffusers file with no LoRA tensors (lora_A / lora_B)")
    return AdapterWeights(modules, source=str(path), format="diffusers")


def _lora_config(meta: Mapping[str, str]) -> dict:
    """The transformer's LoRA config from diffusers' ``lora_adapter_metadata`` (keys ``transformer.<field>`` as
    ``save_lora_weights`` packs them, or unprefixed); {} when the file has none."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    conf = json.loads(raw)
    ours = {k[len(PREFIX):]: v for k, v in conf.items() if k.startswith(PREFIX)}
    return ours or conf


def _pattern_value(patterns: Optional[Mapping[str, float]], module: str, default):
    """PEFT's per-module override: the first pattern that matches the end of the module's dotted name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def export_diffusers(aw: AdapterWeights, out_path: str | Path, *, base: Optional[BaseWeights] = None,
                     base_identity: str = "") -> tuple[Path, list[str]]:
    """Write ``aw`` (atomically) as one ``.safetensors`` for ``AceStepPipeline.load_lora_weights``."""
    sd, notes = to_diffusers(aw, base)
    meta = {
        "format": "pt",
        "sidestep_export": "diffusers",
        "sidestep_export_source": Path(aw.source).name if aw.source else "",
        "sidestep_export_version": __version__,
        "sidestep_adapter": aw.metadata.get("sidestep_adapter") or json.dumps(aw.adapter_type),
    }
    if base_identity:
        meta["sidestep_export_base_identity"] = base_identity
    if notes:
        meta["sidestep_export_notes"] = json.dumps(notes)
    out_path = Path(out_path).expanduser()
    atomic_save_file(sd, out_path, meta)
    return out_path, notes
