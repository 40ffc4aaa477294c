"""A weighted sum of adapters as one new adapter: ΔW = Σ wᵢ·ΔWᵢ, exactly (no SVD, no approximation).

Every additive kind is first written as low-rank factors ΔWᵢ = Uᵢ @ Dᵢ (its scale and weight folded into Uᵢ):

- LoRA: U = w·s·up, D = down (rank r);
- LoHa: (A₁B₁) ⊙ (A₂B₂) = (A₁ ⊙ᵣ A₂)(B₁ ⊙ᶜ B₂), with ⊙ᵣ / ⊙ᶜ the row-wise / column-wise Kronecker products
  (rank r₁·r₂);
- LoKr: kron(U₁V₁, U₂V₂) = kron(U₁, U₂) @ kron(V₁, V₂), a full factor F being F @ I (rank = product of the
  factors' ranks).

The factors of all sources are concatenated, ``[U₁ | U₂ | …] @ [D₁; D₂; …] = Σ Uᵢ Dᵢ``: a LoRA of rank Σ rᵢ and
scale 1, whatever the sources' ranks and alphas. Where that rank would reach min(out, in) — or a source module has
no 2-D low-rank form (full ``diff`` deltas, Tucker or Conv1d LoKr/LoHa) — the target is written as its exact full
delta (``diff``) instead, which is then also the smaller file. Bias deltas add.

DoRA and OFT are refused: their W' is not W + ΔW with a ΔW independent of W (DoRA renormalises the merged weight,
OFT rotates it), so no weighted sum of them is an adapter; bake them into the model (:mod:`.bake`) instead.

:func:`rerank` is the one approximation offered, and only on request: each target cut to its best rank-k
approximation (truncated SVD; Eckart–Young: no rank-k matrix is closer in Frobenius norm), with the relative error
‖ΔW − ΔW_k‖_F / ‖ΔW‖_F of every target returned so it can be stated.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import __version__
from .delta import additive_delta
from .weights import AdapterWeights, ModuleWeights

Factors = tuple[torch.Tensor, torch.Tensor]  # U [out, r], D [r, in] (fp32, weight and scale folded into U)


class MergeError(ValueError):
    """Adapters that cannot be summed into one adapter (the message says why and what to do instead)."""


def _kron_factors(t: dict, side: str) -> Factors:
    if side in t:
        f = t[side].float()
        return f, torch.eye(f.shape[1])
    return t[f"{side}_a"].float(), t[f"{side}_b"].float()


def low_rank_factors(m: ModuleWeights) -> Optional[Factors]:
    """(U, D) with U @ D = ΔW of ``m`` at strength 1 (its scale in U), or None where no 2-D form exists."""
    t = m.tensors
    if m.kind == "lora":
        return (t["up"].float().flatten(1) * m.scale, t["down"].float().flatten(1))
    if m.kind == "loha" and "t1" not in t and t["w1_a"].dim() == 2 and t["w1_b"].dim() == 2:
        a1, b1, a2, b2 = (t[n].float() for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
        up = (a1[:, :, None] * a2[:, None, :]).flatten(1)  # [out, r1·r2]
        down = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)  # [r1·r2, in]
        return up * m.scale, down
    if m.kind == "lokr" and "t2" not in t and all(t[n].dim() == 2 for n in t):
        u1, v1 = _kron_factors(t, "w1")
        u2, v2 = _kron_factors(t, "w2")
        return torch.kron(u1, u2) * m.scale, torch.kron(v1, v2)
    return None


def _check_summable(m: ModuleWeights, name: str, where: str) -> None:
    if m.dora is not None or m.kind == "oft":
        what = "DoRA" if m.dora is not None else "OFT"
        raise MergeError(f"{where}: {name} is {what}, whose change depends on the base weights (W' is not W + ΔW), "
                         "so it cannot be summed into one adapter; bake the adapters into the model instead "
                         "(sidestep merge --bake, or mode 'bake' of the Merge Adapters node)")


def _sum_module(parts: list[tuple[ModuleWeights, float]], name: str) -> ModuleWeights:
    shapes = {m.weight_shape() for m, _ in parts if m.kind != "bias"}
    if len(shapes) > 1:
        raise MergeError(f"{name}: the adapters patch weights of different shapes {sorted(shapes)} "
                         "(made for different models)")
    bias = None
    for m, w in parts:
        if m.bias_diff is not None:
            b = m.bias_diff.float().reshape(-1) * w
            bias = b if bias is None else bias + b
    weighted = [(m, w) for m, w in parts if m.kind != "bias"]
    if not weighted:
        return ModuleWeights("bias", {}, bias_diff=bias)
    shape = torch.Size(shapes.pop())
    factors = [low_rank_factors(m) for m, _ in weighted]
    rank = sum(f[0].shape[1] for f in factors if f is not None)
    if all(f is not None for f in factors) and len(shape) == 2 and rank < min(shape):
        up = torch.cat([u * w for (u, _), (_, w) in zip(factors, weighted)], dim=1)
        down = torch.cat([d for _, d in factors], dim=0)
        return ModuleWeights("lora", {"up": up.contiguous(), "down": down.contiguous()}, scale=1.0,
                             alpha=float(rank), bias_diff=bias)
    diff = sum(additive_delta(m, shape) * w for m, w in weighted)
    return ModuleWeights("diff", {"diff": diff.contiguous()}, bias_diff=bias)


def _common(sources: Sequence[AdapterWeights], key: str) -> Optional[str]:
    values = {aw.metadata.get(key) for aw in sources}
    return values.pop() if len(values) == 1 else None


def weighted_sum(sources: Sequence[tuple[AdapterWeights, float]]) -> AdapterWeights:
    """One adapter whose ΔW at strength 1 is Σ wᵢ·ΔWᵢ of the ``(adapter, weight)`` pairs (see the module doc)."""
    if not sources:
        raise MergeError("nothing to merge: give at least one adapter")
    groups: list[dict[str, list]] = [{}, {}]  # decoder targets, targets outside the decoder
    for aw, w in sources:
        where = aw.source or "adapter"
        for gi, mods in enumerate((aw.modules, aw.outside)):
            for name, m in mods.items():
                _check_summable(m, name, where)
                groups[gi].setdefault(name, []).append((m, float(w)))
    modules, outside = ({n: _sum_module(p, n) for n, p in g.items()} for g in groups)
    adapters = [aw for aw, _ in sources]
    meta = {
        "sidestep_merge": json.dumps([{"source": Path(aw.source).name if aw.source else "", "weight": float(w),
                                       "type": aw.adapter_type} for aw, w in sources]),
        "sidestep_merge_version": __version__,
    }
    for key in ("sidestep_base_variant", "sidestep_base_identity"):
        value = _common(adapters, key)
        if value:
            meta[key] = value
    out = AdapterWeights(modules, meta, source="merged", format="merged", outside=outside)
    out.metadata["sidestep_adapter"] = json.dumps(out.adapter_type)
    kinds = Counter(m.kind for m in out.all_modules().values())
    if kinds.get("diff"):
        out.notes.append(f"{kinds['diff']} target(s) written as full deltas: their summed rank reaches the weight's "
                         "size, or a source module has no low-rank form")
    return out


def _truncated(u: torch.Tensor, d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k factors of u @ d (through QR of both factors, so ΔW itself is never formed) and the relative
    Frobenius error of the truncation."""
    qu, ru = torch.linalg.qr(u.double())
    qd, rd = torch.linalg.qr(d.double().T)
    p, sv, vh = torch.linalg.svd(ru @ rd.T)
    total = float(sv.square().sum())
    err = (float(sv[k:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    root = sv[:k].sqrt()
    return (qu @ p[:, :k] * root).float(), (root[:, None] * (vh[:k] @ qd.T)).float(), err


def rerank(aw: AdapterWeights, rank: int) -> tuple[AdapterWeights, dict[str, float]]:
    """``aw`` with every LoRA / full-delta target of a larger rank cut to rank ``rank`` by truncated SVD, and the
    relative error ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F per target that was cut (0 for none)."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    errors: dict[str, float] = {}

    def cut(name: str, m: ModuleWeights) -> ModuleWeights:
        if m.dora is not None or m.kind not in ("lora", "diff") or len(m.weight_shape()) != 2:
            return m
        if m.kind == "lora":
            if m.rank() <= rank:
                return m
            u, d = m.tensors["up"].float() * m.scale, m.tensors["down"].float()
        else:
            u, d = m.tensors["diff"].float(), torch.eye(m.tensors["diff"].shape[1])
            if min(u.shape) <= rank:
                return m
        up, down, errors[name] = _truncated(u, d, rank)
        return ModuleWeights("lora", {"up": up.contiguous(), "down": down.contiguous()}, scale=1.0,
                             alpha=float(rank), bias_diff=m.bias_diff)

    out = AdapterWeights({n: cut(n, m) for n, m in aw.modules.items()}, dict(aw.metadata), aw.source, aw.format,
                         {n: cut(n, m) for n, m in aw.outside.items()}, list(aw.notes))
    if errors:
        worst = max(errors, key=errors.get)
        out.metadata["sidestep_merge_rank"] = str(rank)
        out.metadata["sidestep_merge_rank_error"] = json.dumps({"max": errors[worst], "target": worst,
                                                                "mean": sum(errors.values()) / len(errors)})
    return out, errors
