"""A leaner forward for PEFT LoRA layers, same parameters and files as PEFT's.

PEFT's ``lora.Linear`` casts its input to the adapter's fp32 dtype (a full fp32 copy of the activations, kept for
backward) and draws an fp32 dropout mask per layer. Here, for plain LoRA (no DoRA, no bias, one adapter):

- dropout is applied in the compute dtype, once per input: q/k/v of self-attention share the layer input, k/v of
  cross-attention share the condition, so they share one mask (activation checkpointing restores the RNG state, so
  the recomputation reproduces that mask);
- adapters on one input run their down-projections as one matmul (``A_q ‖ A_k ‖ A_v``);
- otherwise the maths is PEFT's: ``base(x) + B(A(dropout(x))) · scaling``, summed in the same dtype promotion.

Only the forward changes: the modules, parameter names, state dicts, ComfyUI export and resume are PEFT's. A layer
that is merged, disabled or not plain LoRA at call time falls back to PEFT's own forward.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER = "default"


def _plain(layer: nn.Module) -> bool:
    from peft.tuners.lora import Linear as LoraLinear

    return (
        isinstance(layer, LoraLinear)
        and not layer.merged
        and not layer.disable_adapters
        and list(layer.active_adapters) == [ADAPTER]
        and ADAPTER not in layer.lora_variant
        and not layer.lora_bias.get(ADAPTER, False)
    )


def _dropout_p(layer: nn.Module) -> float:
    drop = layer.lora_dropout[ADAPTER]
    return float(drop.p) if isinstance(drop, nn.Dropout) and layer.training else 0.0


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(x, p)`` in training. On CPU the mask compares 15 random bits with ``p·2¹⁵`` (p exact to 2⁻¹⁵), two
    elements per 32-bit draw of the generator: ``bernoulli_`` in the activations' dtype takes more than twice as long,
    and drawing the generator dominates the mask's time. Same products as PyTorch's ``x · mask · 1/(1−p)``, the same
    saved bool mask, and the same global generator (so checkpointing's RNG restore reproduces it)."""
    if x.device.type != "cpu":
        return F.dropout(x, p)
    n = x.numel()
    bits = torch.empty((n + 1) // 2, dtype=torch.int32).random_().view(torch.int16)  # halves of [0, 2³¹)
    keep = bits.bitwise_and_(0x7FFF)[:n].view(x.shape) >= round(p * 2**15)
    return x * keep * (1.0 / (1.0 - p))


def lora_group(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """``base(x) + B(A(dropout(x)))·s`` for plain LoRA layers that read the same ``x``: one mask, one A matmul."""
    base = [layer.base_layer(x) for layer in layers]
    p = _dropout_p(layers[0])
    h = dropout(x, p) if p else x
    weights = [layer.lora_A[ADAPTER].weight for layer in layers]
    if not torch.is_autocast_enabled(x.device.type) and h.dtype != weights[0].dtype:
        h = h.to(weights[0].dtype)  # PEFT's input cast; under autocast the matmul casts instead
    down = F.linear(h, torch.cat(weights) if len(weights) > 1 else weights[0])
    parts = down.split([w.shape[0] for w in weights], dim=-1) if len(weights) > 1 else (down,)
    return [
        (b + F.linear(d, layer.lora_B[ADAPTER].weight) * layer.scaling[ADAPTER]).to(b.dtype)
        for b, d, layer in zip(base, parts, layers)
    ]


def _single_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or not _plain(layer):
        return type(layer).forward(layer, x, *args, **kwargs)
    return lora_group(x, [layer])[0]


def _project(attn: nn.Module, x: torch.Tensor, src: torch.Tensor):
    """``Attention.project`` with the plain-LoRA projections grouped by the input they read."""
    mods = (attn.q_proj, attn.k_proj, attn.v_proj)
    inputs = (x, src, src)
    out: list = [None, None, None]
    groups: dict[int, list[int]] = {}
    for i, (mod, inp) in enumerate(zip(mods, inputs)):
        if _plain(mod) and (not groups.get(id(inp)) or _dropout_p(mods[groups[id(inp)][0]]) == _dropout_p(mod)):
            groups.setdefault(id(inp), []).append(i)
        else:
            out[i] = mod(inp)
    for idx in groups.values():
        for i, y in zip(idx, lora_group(inputs[idx[0]], [mods[i] for i in idx])):
            out[i] = y
    return tuple(out)


def install(decoder: nn.Module) -> int:
    """Route the decoder's PEFT LoRA layers through the lean forward; returns how many layers it covers."""
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for mod in decoder.modules():
        if isinstance(mod, LoraLinear):
            mod.forward = functools.partial(_single_forward, mod)
            count += 1
        elif hasattr(mod, "project") and all(hasattr(mod, n) for n in ("q_proj", "k_proj", "v_proj")):
            mod.project = functools.partial(_project, mod)
    return count
