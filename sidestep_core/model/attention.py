"""Attention kernel dispatch: PyTorch SDPA by default, flash-attn when installed and usable.

Masks are only built where they change the result: the bidirectional band of sliding layers when the
sequence is longer than the window, and key padding in the lyric encoder. The DiT itself never masks
padding (the pretrained model was trained without it).

Sliding layers without key padding run banded: blocks of ``window`` queries attend to their ``3·window`` keys, so
time and memory grow linearly with length instead of quadratically (the dense masked product would compute and then
discard all but a band of the scores).

On CPUs with bf16 dot products and no AMX, bf16 attention of moderate size (full and cross-attention, and the
banded blocks with their band as a bias) runs as matmuls (``sidestep::matmul_attention``): there PyTorch's CPU flash
kernel is slower (~1.3× forward+backward at a 60 s clip's sizes, bench/RESULTS.md).
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


@functools.lru_cache(maxsize=8)  # 4 bytes per element, 4× the mask's: 4.7 MB at 240 s
def _block_bias_cached(length: int, window: int, block: int, device: torch.device, inference: bool) -> torch.Tensor:
    """The block mask as the matmul attention's additive fp32 bias: 0 where a key is seen, −inf where not."""
    mask = _block_mask_cached(length, window, block, device, inference)
    return torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))


def clear_mask_caches() -> None:
    """Forget the cached attention masks (e.g. the fake tensors a memory plan's step made, which must never reach
    a real forward)."""
    _band_cached.cache_clear()
    _block_mask_cached.cache_clear()
    _block_bias_cached.cache_clear()


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

    kw, vw = windows(k), windows(v)
    if _use_matmuls(qb, kw):
        bias = _cached(_block_bias_cached, t, window, block, q.device)
        out = matmul_attention(qb, kw, vw, bias.repeat(b, 1, 1, 1) if b > 1 else bias)[0]
    else:
        mask = _cached(_block_mask_cached, t, window, block, q.device)
        mask = mask.repeat(b, 1, 1, 1) if b > 1 else mask
        out = F.scaled_dot_product_attention(qb, kw, vw, attn_mask=mask, enable_gqa=h != hkv)
    return out.view(b, n, h, block, d).transpose(1, 2).reshape(b, h, n * block, d)[:, :, :t]


# Largest B·H·Tq·Tk computed as matmuls: the backward holds the probabilities and their gradient in bf16 (4 bytes per
# score) plus fp32 blocks of rows. Beyond it the flash kernel, whose memory does not grow with Tq·Tk, was as fast
# (measured at 3000×600 and 1500² with 4 heads: those two matrices no longer stay in cache).
MATMUL_MAX_SCORES = 2**22
_BLOCK_SCORES = 2**18  # fp32 scores per block of rows: small enough to stay in cache, large enough for the matmuls


@functools.lru_cache(maxsize=1)
def _cpu_prefers_matmuls() -> bool:
    # Measured on avx512_bf16 without AMX; with AMX the flash kernel runs its own bf16 tiles (not measured).
    probe = lambda name: getattr(torch.cpu, name, lambda: False)()  # noqa: E731 - private probes, may move
    return probe("_is_avx512_bf16_supported") and not probe("_is_amx_tile_supported")


def _precise_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of bf16 operands in fp32, to ~2⁻¹⁸ relative (the flash kernel's fp32 scores are then rounded to bf16
    probabilities, 2⁻⁹): the bf16 product plus its rounding error, which a second bf16 matmul gives by subtracting the
    first inside its fp32 accumulator. Two bf16 matmuls cost less than half of one fp32 matmul here."""
    high = torch.matmul(a, b)
    batch = high.shape[:-2]
    low = torch.baddbmm(high.flatten(0, -3), a.expand(*batch, *a.shape[-2:]).flatten(0, -3),
                        b.expand(*batch, *b.shape[-2:]).flatten(0, -3), beta=-1)
    return high.float().add_(low.view(high.shape))  # the fp32 add reads the bf16 term as it goes: one cast less


def _exp_(x: torch.Tensor) -> torch.Tensor:
    # exp of inputs below -87 (results under fp32's normal range, masked -inf) takes a slow path, 2-13x the time
    # of the rest; such terms are below 1e-37 of the row's largest, so clamping them changes no rounded result.
    return x.clamp_(min=-87.0).exp_()


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, T, D] → [B, Hkv, H/Hkv·T, D]: the query heads sharing a KV head become rows of one matmul."""
    return x.reshape(x.shape[0], kv_heads, -1, x.shape[-1])


def _row_blocks(rows: torch.Tensor, queries: int, keys: int):
    """(grouped rows, their queries) in blocks of about ``_BLOCK_SCORES`` scores that never span two heads."""
    step = max(1, _BLOCK_SCORES // (rows.shape[0] * rows.shape[1] * keys))
    step = -(-queries // -(-queries // step))  # even blocks: 128 queries in 43 + 43 + 42, not 56 + 56 + 16
    for head in range(0, rows.shape[2], queries):
        for i in range(0, queries, step):
            yield slice(head + i, head + min(i + step, queries)), slice(i, min(i + step, queries))


def _scores(qg, kt, scale, bias, rows, queries):
    s = _precise_mm(qg[:, :, rows], kt).mul_(scale)
    return s if bias is None else s.add_(bias[:, :, queries])


@torch.library.custom_op("sidestep::matmul_attention", mutates_args=())
def matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of bf16 q [B, H, Tq, D] and k, v [B, Hkv, Tk, D] → (out [B, H, Tq, D], log-sum-exp).

    ``bias``: optional fp32 [B, 1, Tq, Tk] added to the scores of every head (−inf hides a key; each query must
    keep one). The flash kernel's precision: fp32 scores, exponentials rounded to bf16 for the product with v,
    accumulated and normalised in fp32 (normalising before the rounding would double the output's error). A custom
    op, so that selective checkpointing can keep its output."""
    b, h, t, d = q.shape
    k, v = k.contiguous(), v.contiguous()  # heads come transposed out of the projections; strided operands are slow
    qg, kt = _grouped(q, k.shape[1]), k.transpose(-1, -2)
    out = torch.empty(qg.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(*qg.shape[:-1], 1, device=q.device)
    for rows, queries in _row_blocks(qg, t, k.shape[2]):
        s = _scores(qg, kt, d**-0.5, bias, rows, queries)
        top = s.amax(-1, keepdim=True)
        e = _exp_(s.sub_(top))
        total = e.sum(-1, keepdim=True)
        out[:, :, rows] = _precise_mm(e.to(q.dtype), v).div_(total)
        lse[:, :, rows] = total.log_().add_(top)
    return out.view(b, h, t, d), lse


@matmul_attention.register_fake
def _(q, k, v, bias=None):
    b, h, t, d = q.shape
    return q.new_empty(q.shape), q.new_empty(b, k.shape[1], h // k.shape[1] * t, 1, dtype=torch.float32)


def _matmul_attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _matmul_attention_backward(ctx, grad_out, _grad_lse):
    """The flash kernel's backward: probabilities recomputed from the log-sum-exp, dP in fp32, the gradients of the
    scores rounded to bf16 for the products with q and k, each gradient one fp32-accumulated matmul."""
    q, k, v, bias, out, lse = ctx.saved_tensors
    k, v = k.contiguous(), v.contiguous()
    hkv, scale = k.shape[1], q.shape[-1] ** -0.5
    qg, go = _grouped(q, hkv), _grouped(grad_out, hkv)
    delta = (go.float() * _grouped(out, hkv).float()).sum(-1, keepdim=True)
    kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)
    p = torch.empty(*qg.shape[:-1], k.shape[2], dtype=q.dtype, device=q.device)
    ds = torch.empty_like(p)
    for rows, queries in _row_blocks(qg, q.shape[2], k.shape[2]):
        pf = _exp_(_scores(qg, kt, scale, bias, rows, queries).sub_(lse[:, :, rows]))
        p[:, :, rows] = pf
        ds[:, :, rows] = pf.mul_(_precise_mm(go[:, :, rows], vt).sub_(delta[:, :, rows])).mul_(scale)
    grad_v = torch.matmul(p.transpose(-1, -2), go)
    grad_q = torch.matmul(ds, k).view(q.shape)
    return grad_q, torch.matmul(ds.transpose(-1, -2), qg), grad_v, None


matmul_attention.register_autograd(_matmul_attention_backward, setup_context=_matmul_attention_setup)


def _use_matmuls(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == torch.bfloat16
        and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= MATMUL_MAX_SCORES
        and not torch.compiler.is_compiling()
        and _cpu_prefers_matmuls()
    )


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
    if not use_band and key_padding is None and _use_matmuls(q, k):
        return matmul_attention(q, k, v)[0]
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
