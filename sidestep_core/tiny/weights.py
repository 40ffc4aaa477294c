"""Deterministic random weights, seeded per tensor name.

Each tensor draws from its own generator seeded by (seed, key), so a tensor's values depend only on the seed, its
name and its shape — never on which other tensors exist or the order they are made in. Scales keep activations
O(1) so outputs of the tiny models are non-degenerate.
"""

from __future__ import annotations

import hashlib
import math
from typing import Mapping

import torch


def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def seeded_tensor(seed: int, key: str, shape: tuple[int, ...], fan_in_dim: int = 1) -> torch.Tensor:
    """Values for one named tensor; the kind of tensor is read from its name."""
    g = _generator(seed, key)
    noise = torch.randn(shape, generator=g, dtype=torch.float32)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias":
        return noise * 0.02
    if leaf in ("alpha", "beta"):  # Snake activations (log-scale parameters)
        return noise * 0.1
    if leaf == "weight_g":
        return 0.7 * (1.0 + 0.05 * noise)
    if "norm" in key and leaf == "weight" and len(shape) == 1:
        return 1.0 + 0.05 * noise
    if leaf in ("special_token", "special_tokens"):
        return noise * 0.02
    if leaf == "null_condition_emb":
        return noise
    if leaf == "scale_shift_table":
        return noise / math.sqrt(shape[-1])
    if (leaf == "weight" and "embed_tokens" in key and len(shape) == 2
            and not key.startswith(("encoder", "tokenizer", "detokenizer"))):
        return noise * 0.5  # token embedding table of the text encoder
    if len(shape) >= 2:
        fan_in = math.prod(shape[fan_in_dim:]) if fan_in_dim else shape[0]
        return noise / math.sqrt(max(fan_in, 1))
    return noise * 0.02


def seeded_state_dict(
    seed: int, shapes: Mapping[str, tuple[int, ...]], transposed: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """``transposed``: key suffixes of transposed convolutions, whose fan-in is dim 0."""
    return {
        k: seeded_tensor(seed, k, tuple(s), fan_in_dim=0 if k.endswith(transposed) else 1) for k, s in shapes.items()
    }


def bf16_exact(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Round to bf16 values (kept in fp32), so the bf16 files and the in-memory tensors agree exactly."""
    return {k: v.to(torch.bfloat16).float() for k, v in state.items()}
