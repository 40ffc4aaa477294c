"""Write adapters as one ``.safetensors`` file that stock ComfyUI applies exactly (``LoraLoaderModelOnly``,
``comfy.sd.load_lora_for_models``) to an ACE-Step 1.5 model.

Key layout (``<x>`` is the target; ComfyUI maps all three spellings to ``diffusion_model.decoder.<path>.weight``):

- ``key_style="comfy"`` (default): ``diffusion_model.decoder.<path>`` — ComfyUI's generic form, valid for every
  module of the model (targets outside the decoder become ``diffusion_model.<path>``);
- ``key_style="peft"``: ``base_model.model.<path>`` — the ACE-Step alias ComfyUI has since v0.12.1;
- ``key_style="lycoris"``: ``lycoris_<path_with_underscores>`` — the alias ComfyUI has since v0.16.0.
  (Both aliases exist for decoder targets only; anything outside the decoder keeps the generic form.)

Per type, what is written so that ComfyUI's ``calculate_weight`` at strength 1.0 reproduces our merged weight:

- LoRA: ``<x>.lora_up.weight`` [out, r], ``<x>.lora_down.weight`` [r, in], ``<x>.alpha`` = scale·r (ComfyUI applies
  alpha / r; without ``.alpha`` it would apply 1.0 — the classic half-strength PEFT export).
- DoRA: the LoRA keys plus ``<x>.dora_scale``. ComfyUI divides an ``[out, 1]`` scale by the row norm of the *base*
  weight, where PEFT's DoRA divides its magnitude by the row norm of the *merged* weight. The magnitude is therefore
  converted per module, d = m · (‖W‖_row + ε) / ‖W + ΔW‖_row, which is exact for the base weights W it was computed
  with (recorded as ``sidestep_dora_base_identity``) and only approximately right on another fine-tune.
  Column-wise (LyCORIS) DoRA ``[1, in]`` is written as it is: ComfyUI reproduces it on any base.
- LoKr: ``<x>.lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, ``<x>.lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b`` and, when a
  factor is low-rank, ``<x>.alpha`` = scale·rank (ComfyUI ignores alpha when both factors are full matrices; a scale
  other than 1 is then folded into ``lokr_w1``).
- LoHa: ``<x>.hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, ``<x>.alpha`` = scale·rank.
- OFT: ``<x>.oft_blocks`` [n, b, b] and ``<x>.alpha`` = 0 (ComfyUI's OFT reads ``alpha`` as the norm bound on
  blocks − blocksᵀ, in absolute units, where LyCORIS stores it per output row; an active bound is applied here and
  written into the blocks so no bound is needed). ComfyUI loads but ignores ``rescale``, so a rescaled OFT module is
  written as a full ``<x>.diff`` instead — exact, but as large as the weight.
- Full deltas: ``<x>.diff``; bias deltas: ``<x>.diff_b``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from .. import __version__
from ..fsutil import atomic_save_file
from .delta import DORA_EPS, _row_norm, additive_delta, delta_weight, oft_constrained_blocks
from .weights import AdapterWeights, ModuleWeights, resolve_target

KEY_STYLES = ("comfy", "peft", "lycoris")
BaseWeights = Union[nn.Module, Mapping[str, torch.Tensor], Callable[[str], torch.Tensor]]


class ExportError(ValueError):
    """An adapter that cannot be exported as asked (message starts with the adapter's path)."""


def module_key(name: str, inside_decoder: bool, key_style: str = "comfy") -> str:
    if key_style not in KEY_STYLES:
        raise ValueError(f"key_style: must be one of {', '.join(KEY_STYLES)}")
    if not inside_decoder:
        return f"diffusion_model.{name}"
    if key_style == "peft":
        return f"base_model.model.{name}"
    if key_style == "lycoris":
        return "lycoris_" + name.replace(".", "_")
    return f"diffusion_model.decoder.{name}"


def _base_getter(base: Optional[BaseWeights]) -> Optional[Callable[[str], torch.Tensor]]:
    """Decoder-relative target name -> base weight tensor."""
    if base is None:
        return None
    if callable(base) and not isinstance(base, nn.Module):
        return base
    if isinstance(base, nn.Module):
        root = getattr(base, "decoder", base)

        def get(name: str) -> torch.Tensor:
            owner, attr = resolve_target(root, name)
            return getattr(owner, attr).detach()

        return get

    def from_map(name: str) -> torch.Tensor:
        for key in (name, f"{name}.weight", f"decoder.{name}.weight", f"decoder.{name}"):
            if key in base:
                return base[key]
        raise KeyError(name)

    return from_map


def _root_getter(base: Optional[BaseWeights]) -> Optional[Callable[[str], torch.Tensor]]:
    """Model-root name -> weight, for targets outside the decoder (only when the whole model is given)."""
    if not (isinstance(base, nn.Module) and isinstance(getattr(base, "decoder", None), nn.Module)):
        return None

    def get(name: str) -> torch.Tensor:
        owner, attr = resolve_target(base, name)
        return getattr(owner, attr).detach()

    return get


def _scalar(x: float) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float32)


def needs_base(aw: AdapterWeights) -> list[str]:
    """Targets whose ComfyUI form depends on the base weights (PEFT-style row-wise DoRA)."""
    return [n for n, m in aw.all_modules().items() if m.dora is not None and m.dora_mode == "row_merged"]


def _module_entries(m: ModuleWeights, key: str, name: str, get_base, where: str, notes: list[str],
                    dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", dtype if (dtype is not None and t.is_floating_point()) else t.dtype)

    out: dict[str, torch.Tensor] = {}
    t = m.tensors
    if m.kind == "lora":
        out[f"{key}.lora_up.weight"] = cast(t["up"])
        out[f"{key}.lora_down.weight"] = cast(t["down"])
        out[f"{key}.alpha"] = _scalar(m.scale * int(t["down"].shape[0]))
    elif m.kind == "loha":
        for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"):
            if n in t:
                out[f"{key}.hada_{n}"] = cast(t[n])
        out[f"{key}.alpha"] = _scalar(m.scale * int(t["w1_b"].shape[0]))
    elif m.kind == "lokr" and t.get("w2") is not None and t["w2"].dim() == 3:
        # Conv1d LoKr: ComfyUI's loader broadcasts w1 over the leading axis of a 3-D w2 (its trainer and LyCORIS
        # append it), so the product it builds is not the trained one; the exact delta is written instead.
        out[f"{key}.diff"] = additive_delta(m, torch.Size(m.weight_shape())).cpu()
        notes.append("Conv1d LoKr modules written as full deltas (ComfyUI 0.27 misreads 3-D lokr_w2)")
    elif m.kind == "lokr":
        w1 = t.get("w1")
        decomposed = "w2_b" if "w2" not in t else ("w1_b" if "w1" not in t else None)
        if decomposed is None and m.scale != 1.0:
            w1 = t["w1"].float() * m.scale  # ComfyUI applies no scale to two full factors
            notes.append("LoKr scale folded into lokr_w1 (two full Kronecker factors)")
        if w1 is not None:
            out[f"{key}.lokr_w1"] = cast(w1)
        for n in ("w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"):
            if n in t:
                out[f"{key}.lokr_{n}"] = cast(t[n])
        if decomposed is not None:
            out[f"{key}.alpha"] = _scalar(m.scale * int(t[decomposed].shape[0]))
    elif m.kind == "oft":
        if "rescale" in t:
            if get_base is None:
                raise ExportError(f"{where}: {name} is a rescaled OFT module, which ComfyUI cannot apply as OFT; "
                                  "exporting it as a full delta needs the base model (--checkpoint)")
            out[f"{key}.diff"] = delta_weight(m, get_base(name)).cpu()
            notes.append("rescaled OFT modules written as full deltas (ComfyUI ignores OFT rescale)")
        else:
            blocks = t["blocks"]
            if m.constraint > 0:
                blocks = oft_constrained_blocks(blocks.float(), m.constraint)
            out[f"{key}.oft_blocks"] = cast(blocks)
            out[f"{key}.alpha"] = _scalar(0.0)
    elif m.kind == "diff":
        out[f"{key}.diff"] = cast(t["diff"])
    if m.bias_diff is not None:
        out[f"{key}.diff_b"] = cast(m.bias_diff)
    if m.dora is not None:
        out[f"{key}.dora_scale"] = _comfy_dora_scale(m, name, get_base, where)
    return out


def _comfy_dora_scale(m: ModuleWeights, name: str, get_base, where: str) -> torch.Tensor:
    d = m.dora.detach().float().cpu()
    if m.dora_mode == "row_base":
        return d.reshape(-1, 1)
    if m.dora_mode == "col_merged":
        return d.reshape(1, -1)
    if get_base is None:
        raise ExportError(f"{where}: DoRA export needs the base model the adapter was trained on (--checkpoint): "
                          "ComfyUI normalises by the base weight's row norm, so the magnitudes are converted per "
                          "module")
    w = get_base(name).detach().float().cpu()
    merged = w + additive_delta(m, w.shape, w.device)
    d_out = d.reshape(-1, *[1] * (w.dim() - 1)) * (_row_norm(w) + DORA_EPS) / _row_norm(merged)
    return d_out.reshape(-1, 1)


def to_comfyui_state_dict(
    aw: AdapterWeights,
    *,
    base: Optional[BaseWeights] = None,
    key_style: str = "comfy",
    dtype: Optional[torch.dtype] = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(state dict in ComfyUI's format, notes)``. ``base`` (the decoder, or a name → weight map) is needed for
    PEFT-style DoRA and rescaled OFT. ``dtype`` casts the adapter tensors (alpha and converted DoRA scales stay
    fp32); None keeps the source dtypes."""
    get_base = _base_getter(base)
    get_outside = _root_getter(base)
    where = aw.source or "adapter"
    sd: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for inside, mods in ((True, aw.modules), (False, aw.outside)):
        for name, m in mods.items():
            key = module_key(name, inside, key_style)
            entries = _module_entries(m, key, name, get_base if inside else get_outside, where, notes, dtype)
            clash = set(entries) & set(sd)
            if clash:
                raise ExportError(f"{where}: two targets map to the same ComfyUI key {sorted(clash)[0]}")
            sd.update(entries)
    return sd, sorted(set(notes))


def export_metadata(aw: AdapterWeights, key_style: str, *, base_identity: str = "", base_variant: str = "",
                    notes: Optional[list[str]] = None) -> dict[str, str]:
    """The source's metadata plus what the export adds (all values are strings, as safetensors requires)."""
    # lokr_config would make upstream ACE-Step read the file as a LyCORIS LoKr, whose key names it does not have
    meta = {k: v for k, v in aw.metadata.items() if k not in ("format", "lokr_config")}
    meta.update({
        "format": "pt",
        "sidestep_export": "comfyui",
        "sidestep_export_key_style": key_style,
        "sidestep_export_source": Path(aw.source).name if aw.source else "",
        "sidestep_export_version": __version__,
        "sidestep_adapter": meta.get("sidestep_adapter") or json.dumps(aw.adapter_type),
        "sidestep_targets": meta.get("sidestep_targets") or json.dumps(list(aw.modules)),
    })
    if "sidestep_version" not in meta:
        meta["sidestep_version"] = __version__
    if any(m.dora is not None and m.dora_mode == "row_merged" for m in aw.all_modules().values()):
        meta["sidestep_dora_semantics"] = (
            "ComfyUI dora_scale [out,1] converted from a row-wise DoRA magnitude; exact only on the base model "
            "with sidestep_dora_base_identity")
        meta["sidestep_dora_base_identity"] = base_identity or "unknown"
        if base_variant:
            meta["sidestep_dora_base_variant"] = base_variant
    if notes:
        meta["sidestep_export_notes"] = json.dumps(notes)
    return meta


def export_comfyui(
    aw: AdapterWeights,
    out_path: str | Path,
    *,
    base: Optional[BaseWeights] = None,
    base_identity: str = "",
    base_variant: str = "",
    key_style: str = "comfy",
    dtype: Optional[torch.dtype] = None,
) -> tuple[Path, list[str]]:
    """Write ``aw`` to ``out_path`` (atomically) in ComfyUI's format; returns ``(path, notes)``."""
    sd, notes = to_comfyui_state_dict(aw, base=base, key_style=key_style, dtype=dtype)
    meta = export_metadata(aw, key_style, base_identity=base_identity, base_variant=base_variant, notes=notes)
    out_path = Path(out_path).expanduser()
    atomic_save_file(sd, out_path, meta)
    return out_path, notes
