"""The maths of each adapter type: the merged weight W' of one module from its base weight W.

Written from the published definitions (LoRA, Hu et al. 2021; DoRA, Liu et al. 2024; LoKr / LoHa as defined by
LyCORIS, Yeh et al. 2023; OFT with the Cayley parametrisation, Qiu et al. 2023) and checked in the tests against
PEFT's ``merge_and_unload``, LyCORIS's forward pass and ComfyUI's ``calculate_weight``.

- LoRA:  ΔW = s · up @ down
- LoKr:  ΔW = s · kron(w1, w2), each factor full or low-rank (a @ b)
- LoHa:  ΔW = s · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)
- diff:  ΔW = diff
- DoRA (on any of the additive kinds above), with V = W + ΔW:
    row_merged  W' = m ⊙ V / ‖V‖_row          (PEFT ``use_dora``; what training optimises)
    row_base    W' = d ⊙ V / (‖W‖_row + ε)    (ComfyUI's reading of an [out, 1] ``dora_scale``)
    col_merged  W' = V ⊙ d / (‖V‖_col + ε)    (LyCORIS column-wise DoRA; ComfyUI's reading of [1, in])
- OFT:   Q = B − Bᵀ per block (scaled to norm c when a constraint c > 0 is exceeded),
         R = (I + Q)(I − Q)⁻¹, each block of b output rows becomes Rᵀ·rows; W' = rescale ⊙ that.

Strength ``s`` interpolates between the base and the fully adapted weight, ``W + s·(W'−W)``; for the additive kinds
without DoRA this is exactly ``W + s·ΔW``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .weights import ModuleWeights

# ComfyUI adds float32 eps to the norms of its DoRA variants (it computes in float32).
DORA_EPS = float(torch.finfo(torch.float32).eps)


def _f(t: torch.Tensor, device, dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype)


def _product_factor(t, side: str, device, dtype) -> torch.Tensor:
    if side in t:
        return _f(t[side], device, dtype)
    a, b = _f(t[f"{side}_a"], device, dtype), _f(t[f"{side}_b"], device, dtype)
    core = t.get("t2" if side == "w2" else "t1")
    if core is not None:  # Tucker (conv kernels): a is [r, out], b is [r, in]
        return torch.einsum("i j ..., j r, i p -> p r ...", _f(core, device, dtype), b, a)
    return a @ b


def additive_delta(m: ModuleWeights, shape: torch.Size, device=None, dtype=torch.float32) -> torch.Tensor:
    """ΔW of a lora / lokr / loha / diff module, reshaped to ``shape`` (before any DoRA normalisation)."""
    t = m.tensors
    if m.kind == "lora":
        d = _f(t["up"], device, dtype).flatten(1) @ _f(t["down"], device, dtype).flatten(1)
    elif m.kind == "lokr":
        w1 = _product_factor(t, "w1", device, dtype)
        w2 = _product_factor(t, "w2", device, dtype)
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        d = torch.kron(w1, w2)
    elif m.kind == "loha":
        if "t1" in t:
            m1 = torch.einsum("i j ..., j r, i p -> p r ...", _f(t["t1"], device, dtype),
                              _f(t["w1_b"], device, dtype), _f(t["w1_a"], device, dtype))
            m2 = torch.einsum("i j ..., j r, i p -> p r ...", _f(t["t2"], device, dtype),
                              _f(t["w2_b"], device, dtype), _f(t["w2_a"], device, dtype))
        else:
            m1 = _f(t["w1_a"], device, dtype) @ _f(t["w1_b"], device, dtype)
            m2 = _f(t["w2_a"], device, dtype) @ _f(t["w2_b"], device, dtype)
        d = m1 * m2
    elif m.kind == "diff":
        return _f(t["diff"], device, dtype).reshape(shape)
    elif m.kind == "bias":
        return torch.zeros(shape, device=device, dtype=dtype)
    else:
        raise ValueError(f"{m.kind} is not an additive adapter")
    if m.scale != 1.0:
        d = d * m.scale
    return d.reshape(shape)


def _row_norm(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))


def _col_norm(w: torch.Tensor) -> torch.Tensor:
    wt = w.transpose(0, 1)
    return wt.reshape(wt.shape[0], -1).norm(dim=1).reshape(wt.shape[0], *[1] * (w.dim() - 1)).transpose(0, 1)


def apply_dora(m: ModuleWeights, base: torch.Tensor, merged_plain: torch.Tensor) -> torch.Tensor:
    """DoRA's normalisation of ``merged_plain`` = W + ΔW (all fp32, same shape as W)."""
    mag = m.dora.to(merged_plain)
    if m.dora_mode == "row_merged":
        return merged_plain * (mag.reshape(-1).reshape(-1, *[1] * (base.dim() - 1)) / _row_norm(merged_plain))
    if m.dora_mode == "row_base":
        return merged_plain * (mag.reshape(-1).reshape(-1, *[1] * (base.dim() - 1)) / (_row_norm(base) + DORA_EPS))
    if m.dora_mode == "col_merged":
        shape = [1, base.shape[1], *[1] * (base.dim() - 2)]
        return merged_plain * (mag.reshape(shape) / (_col_norm(merged_plain) + DORA_EPS))
    raise ValueError(f"unknown DoRA mode {m.dora_mode!r}")


def oft_rotation(blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ per block, Q = B − Bᵀ (norm-bounded by ``constraint`` when it is > 0)."""
    q = blocks - blocks.transpose(1, 2)
    if constraint and constraint > 0:
        norm = q.norm() + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(blocks.shape[1], device=blocks.device, dtype=blocks.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def oft_constrained_blocks(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """Blocks B' with B' − B'ᵀ equal to the constrained Q of ``blocks`` (so no constraint is needed any more)."""
    q = blocks - blocks.transpose(1, 2)
    if constraint and constraint > 0:
        norm = q.norm() + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    return q / 2


def _oft_merged(m: ModuleWeights, base: torch.Tensor) -> torch.Tensor:
    blocks = m.tensors["blocks"].to(base)
    n, b, _ = blocks.shape
    r = oft_rotation(blocks, m.constraint)
    rest = base.shape[1:]
    out = torch.einsum("k n m, k n ... -> k m ...", r, base.reshape(n, b, *rest)).reshape(base.shape)
    if "rescale" in m.tensors:
        out = m.tensors["rescale"].to(base).reshape(-1, *[1] * (base.dim() - 1)) * out
    return out


def merged_weight(m: ModuleWeights, weight: torch.Tensor, strength: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W' = W + strength·(W'₁ − W) in ``dtype`` (fp32 by default), on ``weight``'s device."""
    base = weight.detach().to(dtype)
    if m.kind == "oft":
        full = _oft_merged(m, base)
    else:
        full = base + additive_delta(m, base.shape, base.device, dtype)
        if m.dora is not None:
            full = apply_dora(m, base, full)
    if strength == 1.0:
        return full
    return base + strength * (full - base)


def delta_weight(m: ModuleWeights, weight: torch.Tensor, strength: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W'(strength) − W, in ``dtype``."""
    if m.kind in ("lora", "lokr", "loha", "diff", "bias") and m.dora is None:
        return strength * additive_delta(m, weight.shape, weight.device, dtype)
    return merged_weight(m, weight, strength, dtype) - weight.detach().to(dtype)


def bias_delta(m: ModuleWeights, bias: Optional[torch.Tensor], strength: float = 1.0) -> Optional[torch.Tensor]:
    if m.bias_diff is None or bias is None:
        return None
    return strength * m.bias_diff.to(device=bias.device, dtype=torch.float32).reshape(bias.shape)
