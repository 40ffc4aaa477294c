"""Attention kernel dispatch: PyTorch SDPA by default, flash-attn when installed and usable.

Masks are only built where they change the result: the bidirectional band of sliding layers when the
sequence is longer than the window, and key padding in the lyric encoder. The DiT itself never masks
padding (the pretrained model was trained without it).

Sliding layers without key padding run banded: blocks of ``window`` queries attend to their ``3·window`` keys, so
time and memory grow linearly with length instead of quadratically (the dense masked product would compute and then
discard all but a band of the scores).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=1)
def _flash_attn_func():
    if os.environ.get("SIDESTEP_DISABLE_FLASH_ATTN"):
        return None
    try:
        from flash_attn import flash_attn_func  # type: ignore
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_func


@functools.lru_cache(maxsize=64)
def _band_cached(length: int, window: int, device: torch.device, inference: bool) -> torch.Tensor:
    idx = torch.arange(length, device=device)
    return (idx[:, None] - idx[None, :]).abs() <= window


def _cached(fn, *key):
    # Keyed by inference mode: a mask made under inference_mode cannot be saved for a later backward. Under
    # torch.compile the mask is built inside the graph instead (dynamo cannot read the inference-mode flag).
    if torch.compiler.is_compiling():
        return fn.__wrapped__(*key, False)
    return fn(*key, torch.is_inference_mode_enabled())


def _band(length: int, window: int, device: torch.device) -> torch.Tensor:
    return _cached(_band_cached, length, window, device)


@functools.lru_cache(maxsize=64)
def _block_mask_cached(length: int, window: int, block: int, device: torch.device, inference: bool) -> torch.Tensor:
    """[n_blocks, 1, block, block + 2·window]: query ``b·block + a`` may see padded key ``b·block + j`` (absolute
    key ``b·block + j − window``) when ``|a − j + window| ≤ window`` and the key is inside the sequence."""
    n = -(-length // block)
    a = torch.arange(block, device=device)[:, None]
    j = torch.arange(block + 2 * window, device=device)[None, :]
    band = (j - a >= 0) & (j - a <= 2 * window)
    key = torch.arange(n, device=device)[:, None, None] * block + j - window
    return (band & (key >= 0) & (key < length))[:, None]


def clear_mask_caches() -> None:
    """Forget the cached attention masks (e.g. the fake tensors a memory plan's step made, which must never reach
    a real forward)."""
    _band_cached.cache_clear()
    _block_mask_cached.cache_clear()


def _banded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Exact |i − j| ≤ window self-attention by blocks of ``window`` queries ([B, H, T, D] in and out)."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    block = window
    n = -(-t // block)
    extra = n * block - t
    qb = F.pad(q, (0, 0, 0, extra)).view(b, h, n, block, d).transpose(1, 2).reshape(b * n, h, block, d)

    def windows(x: torch.Tensor) -> torch.Tensor:  # [B, Hkv, T, D] → [B·n, Hkv, block + 2·window, D]
        x = F.pad(x, (0, 0, window, window + extra)).unfold(2, block + 2 * window, block)  # [B, Hkv, n, D, W]
        return x.permute(0, 2, 1, 4, 3).reshape(b * n, hkv, block + 2 * window, d)

    mask = _cached(_block_mask_cached, t, window, block, q.device)
    mask = mask.expand(n, 1, block, block + 2 * window).repeat(b, 1, 1, 1) if b > 1 else mask
    out = F.scaled_dot_product_attention(qb, windows(k), windows(v), attn_mask=mask, enable_gqa=h != hkv)
    return out.view(b, n, h, block, d).transpose(1, 2).reshape(b, h, n * block, d)[:, :, :t]


def _can_use_flash(q: torch.Tensor, key_padding: Optional[torch.Tensor]) -> bool:
    return (
        key_padding is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
        and _flash_attn_func() is not None
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: Optional[int] = None,
    key_padding: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q: [B, H, Tq, D]; k, v: [B, Hkv, Tk, D] (Hkv divides H). Returns [B, H, Tq, D].

    ``window``: keep only |i − j| ≤ window (self-attention only). ``key_padding``: [B, Tk], true = real token.
    """
    tq, tk = q.shape[2], k.shape[2]
    use_band = window is not None and max(tq, tk) - 1 > window
    if _can_use_flash(q, key_padding):
        w = (window, window) if use_band else (-1, -1)
        out = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window_size=w)
        return out.transpose(1, 2)

    if use_band and key_padding is None and tq == tk:
        return _banded(q, k, v, window)
    mask = None
    if use_band:
        mask = _band(tq, window, q.device)[None, None]
    if key_padding is not None:
        pad = key_padding.bool()[:, None, None, :]
        keep = pad if mask is None else mask & pad
        # Upstream adds finfo.min (not -inf) to hidden keys: a query whose window holds no real key (padding far
        # from the lyrics) then averages all values uniformly, where a bool mask gives zeros. Same numbers elsewhere.
        mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
