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
