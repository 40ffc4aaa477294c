"""Banded sliding-window attention equals the dense masked product, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sidestep_core.model import attention as attn


def _dense(q, k, v, window):
    mask = attn._band(q.shape[2], window, q.device)[None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("batch,length,window", [(1, 750, 128), (2, 301, 128), (1, 130, 128), (2, 1000, 16),
                                                 (3, 37, 4)])
def test_banded_matches_dense_forward_and_backward(batch, length, window):
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(batch, h, length, 32, generator=gen, requires_grad=True) for h in (4, 2, 2))
    grad = torch.randn(batch, 4, length, 32, generator=gen)
    ref = _dense(q, k, v, window)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    out = attn.attention(q, k, v, window=window)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert (out - ref).abs().max() < 2e-6
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() < 2e-6


def test_short_sequences_and_key_padding_keep_the_dense_path(monkeypatch):
    calls = []
    monkeypatch.setattr(attn, "_banded", lambda *a: calls.append(a))
    q = torch.randn(1, 2, 20, 8)
    attn.attention(q, q, q, window=32)  # shorter than the window: no mask at all
    attn.attention(q, q, q, window=4, key_padding=torch.ones(1, 20, dtype=torch.bool))  # upstream's padding rule
    assert calls == []
    attn.attention(q, q, q, window=4)
    assert len(calls) == 1


needs_bf16_matmuls = pytest.mark.skipif(not attn._cpu_prefers_matmuls(), reason="CPU without avx512_bf16, or with AMX")


def _errors(fn, q, k, v, grad, exact):
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, grad)
    return [((a.double() - e).abs().max() / e.abs().max()).item() for a, e in zip((out, *grads), exact)]


@needs_bf16_matmuls
@pytest.mark.parametrize("batch,heads,kv_heads,tq,tk,spread", [(1, 4, 2, 750, 750, 2), (1, 4, 2, 750, 600, 2),
                                                                (2, 4, 4, 37, 50, 2), (1, 8, 2, 301, 1, 2),
                                                                (1, 4, 2, 200, 150, 12)])
def test_matmul_attention_is_as_exact_as_the_flash_kernel(batch, heads, kv_heads, tq, tk, spread):
    # spread 12: scores spanning hundreds, most exponentials under fp32's range (peaky attention of a trained model)
    gen = torch.Generator().manual_seed(tq + tk)
    q = (spread * torch.randn(batch, heads, tq, 64, generator=gen)).bfloat16()
    k = (2 * torch.randn(batch, kv_heads, tk, 64, generator=gen)).bfloat16()
    v = torch.randn(batch, kv_heads, tk, 64, generator=gen).bfloat16()
    grad = torch.randn(batch, heads, tq, 64, generator=gen).bfloat16()

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=heads != kv_heads)

    xs = [x.double().requires_grad_() for x in (q, k, v)]
    out = sdpa(*xs)
    exact = (out, *torch.autograd.grad(out, xs, grad.double()))
    ours = _errors(lambda q, k, v: attn.matmul_attention(q, k, v)[0], q, k, v, grad, exact)
    kernel = _errors(sdpa, q, k, v, grad, exact)
    # Output: the kernel's roundings exactly (bf16 exponentials, fp32 accumulation); gradients: no worse than its.
    for o, r in zip(ours, kernel):
        assert o <= 1.2 * r + 1e-4, (ours, kernel)


@needs_bf16_matmuls
def test_cpu_bf16_attention_dispatch(monkeypatch):
    calls = []
    real = attn.matmul_attention
    monkeypatch.setattr(attn, "matmul_attention", lambda *a: calls.append(a) or real(*a))
    q = torch.randn(1, 2, 300, 16, dtype=torch.bfloat16)
    attn.attention(q, q, q)  # full attention
    attn.attention(q, q[:, :, :40], q[:, :, :40])  # cross-attention
    attn.attention(q, q, q, window=32)  # banded: the matmul op on its blocks, the band as a bias
    attn.attention(q.float(), q.float(), q.float())  # fp32: the flash kernel
    monkeypatch.setattr(attn, "MATMUL_MAX_SCORES", 2 * 300 * 300 - 1)  # over the memory bound: the flash kernel
    attn.attention(q, q, q)
    monkeypatch.setattr(attn, "MATMUL_MAX_SCORES", 2 * 10 * 32 * 96 - 1)  # banded blocks over it: the flash kernel
    attn.attention(q, q, q, window=32)
    assert len(calls) == 3
    assert calls[2][3].shape == (10, 1, 32, 96) and calls[2][3].dtype == torch.float32


@needs_bf16_matmuls
@pytest.mark.parametrize("batch,t,window,spread", [(1, 750, 128, 2), (2, 301, 32, 2), (1, 260, 64, 12)])
def test_banded_matmul_attention_is_as_exact_as_the_masked_kernel(batch, t, window, spread):
    gen = torch.Generator().manual_seed(t + window)
    q = (spread * torch.randn(batch, 4, t, 64, generator=gen)).bfloat16()
    k = (2 * torch.randn(batch, 2, t, 64, generator=gen)).bfloat16()
    v = torch.randn(batch, 2, t, 64, generator=gen).bfloat16()
    grad = torch.randn(batch, 4, t, 64, generator=gen).bfloat16()
    band = attn._band_cached(t, window, q.device, False)

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True)

    xs = [x.double().requires_grad_() for x in (q, k, v)]
    out = dense(*xs)
    exact = (out, *torch.autograd.grad(out, xs, grad.double()))
    ours = _errors(lambda q, k, v: attn.attention(q, k, v, window=window), q, k, v, grad, exact)
    kernel = _errors(dense, q, k, v, grad, exact)
    for o, r in zip(ours, kernel):
        assert o <= 1.2 * r + 1e-4, (ours, kernel)
