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
@pytest.mark.parametrize("batch,heads,kv_heads,tq,tk", [(1, 4, 2, 750, 750), (1, 4, 2, 750, 600), (2, 4, 4, 37, 50),
                                                         (1, 8, 2, 301, 1)])
def test_matmul_attention_is_as_exact_as_the_flash_kernel(batch, heads, kv_heads, tq, tk):
    gen = torch.Generator().manual_seed(tq + tk)
    q = (2 * torch.randn(batch, heads, tq, 64, generator=gen)).bfloat16()
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
    attn.attention(q, q, q, window=32)  # banded: the flash kernel on its blocks
    attn.attention(q.float(), q.float(), q.float())  # fp32: the flash kernel
    monkeypatch.setattr(attn, "MATMUL_MAX_SCORES", 2 * 300 * 300 - 1)  # over the memory bound: the flash kernel
    attn.attention(q, q, q)
    assert len(calls) == 2
