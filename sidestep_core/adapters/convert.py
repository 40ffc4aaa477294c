"""From the common form back to what the trainer uses, so an adapter from any file can be trained further.

``trainer_settings(aw)`` gives the ``TrainConfig`` keys that make ``training.adapters.inject_adapter`` build an
adapter of the same type, targets and shapes; ``to_trainer_state_dict(aw)`` gives its weights under the keys that
adapter's ``state_dict()`` / ``load_state_dict()`` use (PEFT keys for LoRA / DoRA, LyCORIS keys for LoKr / LoHa /
OFT). Only decoder targets of one type can be trained; DoRA read from a ComfyUI-format file needs the base weights
to turn its ``dora_scale`` back into PEFT's magnitude.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Optional

import torch

from .comfy_export import BaseWeights, _base_getter
from .delta import DORA_EPS, _row_norm, additive_delta
from .weights import AdapterWeights, ModuleWeights


class ConversionError(ValueError):
    """An adapter the trainer cannot continue (message starts with the adapter's path)."""


def _lycoris_factorization(dim: int, factor: int) -> tuple[int, int]:
    from lycoris.functional import factorization

    return factorization(dim, factor)


def _kind(aw: AdapterWeights) -> str:
    where = aw.source or "adapter"
    if aw.outside:
        raise ConversionError(f"{where}: adapts modules outside the decoder ({next(iter(aw.outside))}, …); the "
                              "trainer adapts decoder projections only")
    kind = aw.adapter_type
    if kind not in ("lora", "dora", "lokr", "loha", "oft"):
        raise ConversionError(f"{where}: a {kind} adapter cannot be trained further")
    odd = [n for n, m in aw.modules.items() if m.kind in ("diff", "bias") or m.bias_diff is not None]
    if odd:
        raise ConversionError(f"{where}: {odd[0]} holds a full delta, which the trainer cannot continue")
    if kind == "dora" and any(m.dora is None for m in aw.modules.values()):
        raise ConversionError(f"{where}: mixes DoRA and plain LoRA modules")
    if kind == "dora" and any(m.dora_mode == "col_merged" for m in aw.modules.values()):
        raise ConversionError(f"{where}: column-wise (LyCORIS) DoRA cannot be continued as PEFT DoRA")
    return kind


def _common(values: list[float]) -> float:
    return Counter(values).most_common(1)[0][0]


def trainer_settings(aw: AdapterWeights) -> dict[str, Any]:
    """``TrainConfig`` keys (adapter, target_modules, rank, alpha, patterns, type options) reproducing the adapter's
    structure; combine with the run's other settings."""
    kind = _kind(aw)
    names = list(aw.modules)
    out: dict[str, Any] = {"adapter": kind, "target_modules": names}
    if kind == "oft":
        sizes = {n: int(m.tensors["blocks"].shape[1]) for n, m in aw.modules.items()}
        rescaled = {"rescale" in m.tensors for m in aw.modules.values()}
        constraints = {m.constraint / (m.tensors["blocks"].shape[0] * m.tensors["blocks"].shape[1])
                       for m in aw.modules.values()}
        if len(rescaled) > 1 or len(constraints) > 1:
            raise ConversionError(f"{aw.source}: OFT modules differ in rescale / constraint")
        block = max(sizes.values())
        for n, m in aw.modules.items():
            width = m.tensors["blocks"].shape[0] * m.tensors["blocks"].shape[1]
            if _lycoris_factorization(width, block)[0] != sizes[n]:
                raise ConversionError(f"{aw.source}: {n} uses OFT blocks of {sizes[n]}, which block size {block} "
                                      "does not reproduce")
        out.update(oft_block_size=block, oft_rescaled=rescaled.pop(), oft_constraint=float(constraints.pop()))
        return out
    ranks = {n: m.rank() for n, m in aw.modules.items()}  # None: LoKr with two full factors
    alphas = {n: _alpha_of(m) for n, m in aw.modules.items()}  # None: alpha has no effect
    full_need = {n: _full_rank(m) for n, m in aw.modules.items() if ranks[n] is None}
    known = [r for r in ranks.values() if r is not None]
    rank = int(_common(known)) if known else max(full_need.values())
    alpha = float(_common([a for a in alphas.values() if a is not None] or [float(rank)]))
    rank_pattern = {re.escape(n): int(r) for n, r in ranks.items() if r is not None and r != rank}
    rank_pattern.update({re.escape(n): need for n, need in full_need.items() if rank < need})
    out.update(rank=rank, alpha=alpha, rank_pattern=rank_pattern,
               alpha_pattern={re.escape(n): float(a) for n, a in alphas.items() if a is not None and a != alpha})
    if kind == "lokr":
        out.update(_lokr_options(aw, rank))
    return out


def _alpha_of(m: ModuleWeights) -> Optional[float]:
    """The alpha that gives this module its scale (scale · rank); None where LyCORIS ignores alpha."""
    r = m.rank()
    if m.kind == "lokr" and r is None:
        return None
    return float(m.scale * r)


def _full_rank(m: ModuleWeights) -> int:
    """The smallest LyCORIS ``lora_dim`` that keeps both LoKr factors of ``m`` full matrices."""
    w2 = m.tensors["w2"]
    return int(math.ceil(max(w2.shape[0], w2.shape[1]) / 2))


def _lokr_options(aw: AdapterWeights, rank: int) -> dict[str, Any]:
    w1_shapes = {n: (m.tensors["w1"].shape if "w1" in m.tensors else
                     (m.tensors["w1_a"].shape[0], m.tensors["w1_b"].shape[1])) for n, m in aw.modules.items()}
    decompose_both = any("w1_a" in m.tensors for m in aw.modules.values())
    for factor in [-1] + sorted({int(s[0]) for s in w1_shapes.values()}):
        if all(tuple(_lokr_w1(aw.modules[n], factor)) == tuple(s) for n, s in w1_shapes.items()):
            return {"lokr_factor": factor, "lokr_decompose_both": decompose_both, "lokr_full_matrix": False}
    raise ConversionError(f"{aw.source}: the LoKr factor shapes match no single factorisation setting")


def _lokr_w1(m: ModuleWeights, factor: int) -> tuple[int, int]:
    out, inp = m.weight_shape()[:2]
    return _lycoris_factorization(out, factor)[0], _lycoris_factorization(inp, factor)[0]


def to_trainer_state_dict(aw: AdapterWeights, base: Optional[BaseWeights] = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the trainer's keys (fp32)."""
    kind = _kind(aw)
    get_base = _base_getter(base)
    sd: dict[str, torch.Tensor] = {}
    for name, m in aw.modules.items():
        t = {k: v.detach().float() for k, v in m.tensors.items()}
        if kind in ("lora", "dora"):
            x = f"base_model.model.{name}"
            sd[f"{x}.lora_A.weight"] = t["down"]
            sd[f"{x}.lora_B.weight"] = t["up"]
            if kind == "dora":
                sd[f"{x}.lora_magnitude_vector"] = _peft_magnitude(m, name, get_base, aw.source)
            continue
        x = "lycoris_" + name.replace(".", "_")
        if kind == "oft":
            sd[f"{x}.oft_blocks"] = t["blocks"]
            if "rescale" in t:
                sd[f"{x}.rescale"] = t["rescale"]
            width = t["blocks"].shape[0] * t["blocks"].shape[1]
            sd[f"{x}.alpha"] = torch.tensor(m.constraint / width)
            continue
        prefix = "lokr_" if kind == "lokr" else "hada_"
        if kind == "lokr" and "w1" in t and "w2" in t and m.scale != 1.0:
            t["w1"] = t["w1"] * m.scale
        for k, v in t.items():
            sd[f"{x}.{prefix}{k}"] = v
        a = _alpha_of(m)
        sd[f"{x}.alpha"] = torch.tensor(float(a if a is not None else _full_rank(m)))
    return sd


def _peft_magnitude(m: ModuleWeights, name: str, get_base, source: str) -> torch.Tensor:
    d = m.dora.detach().float().reshape(-1)
    if m.dora_mode == "row_merged":
        return d
    if get_base is None:
        raise ConversionError(f"{source}: turning ComfyUI's dora_scale back into PEFT's magnitude needs the base "
                              "model")
    w = get_base(name).detach().float().cpu()
    merged = w + additive_delta(m, w.shape, w.device)
    return (d.reshape(-1, *[1] * (w.dim() - 1)) * _row_norm(merged) / (_row_norm(w) + DORA_EPS)).reshape(-1)

