"""What upstream ACE-Step 1.5's own adapter loader reads, and writing it.

Upstream's Gradio UI / API load an adapter folder in one of two ways (its LoRA lifecycle code):

- a folder with ``adapter_config.json``: ``PeftModel.from_pretrained(model.decoder, folder)`` — any PEFT type;
- a ``lokr_weights.safetensors`` (or any safetensors whose metadata has ``lokr_config``): a LyCORIS LoKr network is
  built from the JSON in the metadata key ``lokr_config`` (the fields of upstream's ``LoKRConfig``) and the file's
  weights are loaded into it.

Nothing else is read: a LyCORIS LoHa or OFT file is refused. So LoKr files carry ``lokr_config`` (written at save
time, :func:`lokr_config`), and :func:`export_peft` writes a PEFT folder for every other adapter:

- LoRA / row-wise DoRA: PEFT LoRA (``use_dora``), per-module rank and alpha as ``rank_pattern`` / ``alpha_pattern``;
- LoHa: PEFT LoHa — the same maths as LyCORIS's, ΔW = (alpha/r)·(w1_a @ w1_b) ⊙ (w2_a @ w2_b), same tensor shapes;
- everything else (OFT, LoKr, other DoRA forms, full deltas): a PEFT LoRA of the exact ΔW at full rank
  (r = min(out, in), scale 1). PEFT's own OFT cannot hold a LyCORIS diag-OFT: PEFT rotates the layer's *input*
  (W·blockdiag(R)), diag-OFT its *output* (blockdiag(Rᵀ)·W, then ``rescale``), and W⁻¹·blockdiag(Rᵀ)·W is not
  block-diagonal; PEFT has no ``rescale`` either. ΔW of an OFT depends on the base weights, so that export is exact
  for the base model it was computed with (recorded in the metadata) — and as large as the adapted weights.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .. import __version__
from ..fsutil import atomic_save_file, atomic_write_json
from .comfy_export import BaseWeights, ExportError, _base_getter
from .delta import delta_weight
from .weights import AdapterWeights, ModuleWeights

LOKR_CONFIG_KEY = "lokr_config"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def lokr_config(options: Mapping[str, Any], targets: list[str]) -> dict[str, Any]:
    """The ``lokr_config`` metadata upstream builds its LoKr network from (its ``LoKRConfig`` fields).

    Upstream has one rank and alpha for every module: a LoKr trained with ``rank_pattern`` / ``alpha_pattern``
    does not fit what it builds (use :func:`export_peft` for that)."""
    return {
        "linear_dim": int(options["rank"]),
        "linear_alpha": float(options["alpha"]),
        "factor": int(options.get("factor", -1)),
        "decompose_both": bool(options.get("decompose_both", False)),
        "use_tucker": bool(options.get("use_tucker", False)),
        "use_scalar": bool(options.get("use_scalar", False)),
        "weight_decompose": False,
        "target_modules": list(targets),
        "full_matrix": bool(options.get("full_matrix", False)),
        "bypass_mode": False,
        "rs_lora": False,
        "unbalanced_factorization": False,
    }


# ----------------------------------------------------------------------------------------------------------
# PEFT folders
# ----------------------------------------------------------------------------------------------------------


def _pattern(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(most common value, {escaped full name: value} for the modules that differ from it)."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {re.escape(n): v for n, v in values.items() if v != common}


def _peft_config(peft_type: str, targets: list[str], ranks: dict[str, int], alphas: dict[str, float],
                 **extra: Any) -> dict[str, Any]:
    from peft import LoHaConfig, LoraConfig

    r, rank_pattern = _pattern(ranks)
    alpha, alpha_pattern = _pattern(alphas)
    cls = LoraConfig if peft_type == "LORA" else LoHaConfig
    alpha_key = "lora_alpha" if peft_type == "LORA" else "alpha"
    conf = cls(r=r, target_modules=list(targets), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
               **{alpha_key: alpha}, **extra).to_dict()
    out = {k: (sorted(v) if isinstance(v, set) else getattr(v, "value", v)) for k, v in conf.items()}
    out.update(base_model_name_or_path="", inference_mode=True)
    return out


def _as_lora(m: ModuleWeights) -> bool:
    return m.kind == "lora" and m.bias_diff is None and m.dora_mode in (None, "row_merged")


def _as_loha(m: ModuleWeights) -> bool:
    return m.kind == "loha" and m.bias_diff is None and m.dora is None and "t1" not in m.tensors


def to_peft(aw: AdapterWeights, base: Optional[BaseWeights] = None
            ) -> tuple[dict[str, torch.Tensor], dict, list[str], bool]:
    """``(state dict, adapter_config.json, notes, depends on the base)`` of a PEFT adapter equal to ``aw`` at
    strength 1.

    ``base`` (the decoder, or a name → weight map) is needed when the delta depends on the base weights (OFT,
    DoRA other than PEFT's)."""
    where = aw.source or "adapter"
    if aw.outside:
        raise ExportError(f"{where}: PEFT folders for ACE-Step adapt the decoder only; this adapter also changes "
                          f"{len(aw.outside)} module(s) outside it (e.g. {next(iter(aw.outside))})")
    if any(m.bias_diff is not None for m in aw.modules.values()):
        raise ExportError(f"{where}: bias deltas cannot be written as a PEFT LoRA")
    mods = aw.modules
    sd: dict[str, torch.Tensor] = {}
    key = "base_model.model.{}.{}".format
    if mods and all(_as_loha(m) for m in mods.values()):
        for name, m in mods.items():
            for t in ("w1_a", "w1_b", "w2_a", "w2_b"):
                sd[key(name, f"hada_{t}")] = m.tensors[t].float().contiguous()
        ranks = {n: m.rank() for n, m in mods.items()}
        conf = _peft_config("LOHA", list(mods), ranks, {n: m.scale * ranks[n] for n, m in mods.items()})
        return sd, conf, [], False

    notes: list[str] = []
    get_base = _base_getter(base)
    ranks, alphas, dora, base_dependent = {}, {}, False, False
    for name, m in mods.items():
        if _as_lora(m):
            sd[key(name, "lora_A.weight")] = m.tensors["down"].float().reshape(m.rank(), -1).contiguous()
            sd[key(name, "lora_B.weight")] = m.tensors["up"].float().reshape(-1, m.rank()).contiguous()
            ranks[name], alphas[name] = m.rank(), m.scale * m.rank()
            if m.dora is not None:
                sd[key(name, "lora_magnitude_vector")] = m.dora.float().reshape(-1).contiguous()
                dora = True
            continue
        if m.kind not in ("lora", "lokr", "loha", "oft", "diff"):
            raise ExportError(f"{where}: {name}: a {m.kind} module cannot be written as PEFT")
        on_base = m.kind == "oft" or m.dora is not None
        if on_base and get_base is None:
            raise ExportError(f"{where}: writing {m.kind}{' DoRA' if m.dora is not None else ''} as PEFT needs the "
                              "base model it was trained on (its delta depends on the base weights)")
        # an additive delta depends on the weight's shape only
        weight = get_base(name).float() if get_base is not None else torch.zeros(m.weight_shape())
        if weight.dim() != 2:
            raise ExportError(f"{where}: {name}: only linear layers can be written as a full-rank PEFT LoRA")
        dw = delta_weight(m, weight)
        out, inp = dw.shape
        r = min(out, inp)
        eye = torch.eye(r)
        sd[key(name, "lora_A.weight")] = (eye if inp <= out else dw).contiguous()
        sd[key(name, "lora_B.weight")] = (dw if inp <= out else eye).contiguous()
        ranks[name], alphas[name] = r, float(r)
        notes.append(f"{m.kind} modules written as full-rank LoRA deltas"
                     + (", exact for the base model given only" if on_base else ""))
        base_dependent = base_dependent or on_base
    if dora and any(m.dora is None for m in mods.values()):
        raise ExportError(f"{where}: mixes DoRA and plain modules, which one PEFT config cannot describe")
    conf = _peft_config("LORA", list(mods), ranks, alphas, use_dora=dora)
    return sd, conf, sorted(set(notes)), base_dependent


def export_peft(aw: AdapterWeights, folder: str | Path, *, base: Optional[BaseWeights] = None,
                base_identity: str = "", base_variant: str = "") -> tuple[Path, list[str]]:
    """Write ``aw`` as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``, atomically per file)
    that upstream ACE-Step loads with ``PeftModel.from_pretrained(model.decoder, folder)``."""
    sd, conf, notes, on_base = to_peft(aw, base)
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in aw.metadata.items() if k not in ("format", "algo", LOKR_CONFIG_KEY)}
    meta.update({
        "format": "pt",
        "sidestep_export": "peft",
        "sidestep_export_source": Path(aw.source).name if aw.source else "",
        "sidestep_export_version": __version__,
        "sidestep_adapter": meta.get("sidestep_adapter") or json.dumps(aw.adapter_type),
    })
    if notes:
        meta["sidestep_export_notes"] = json.dumps(notes)
    if on_base:
        meta["sidestep_export_base_identity"] = base_identity or "unknown"
        if base_variant:
            meta["sidestep_export_base_variant"] = base_variant
    atomic_save_file(sd, folder / PEFT_WEIGHTS, meta)
    atomic_write_json(folder / PEFT_CONFIG, conf)
    return folder, notes
