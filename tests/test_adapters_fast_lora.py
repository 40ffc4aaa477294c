"""The lean LoRA forward (training/fast_lora.py) against PEFT's own LoraLayer forward: equal outputs and gradients
with dropout 0, with the same dropout masks, with activation checkpointing, and under bf16 autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from torch import nn

from sidestep_core.config import TrainConfig
from sidestep_core.model import AceStepConfig, AceStepModel
from sidestep_core.training import fast_lora
from sidestep_core.training.adapters import inject_adapter
from train_helpers import single_thread  # noqa: F401

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, sliding_window=8, text_hidden_dim=32, num_lyric_encoder_hidden_layers=1,
            num_timbre_encoder_hidden_layers=1, num_attention_pooler_hidden_layers=1, fsq_dim=64)
B, FRAMES, COND = 2, 40, 7


class FixedMask(nn.Module):
    """Dropout with a mask given in advance (PEFT's dropout slot in the reference)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def _pair(dropout=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    dec = AceStepModel(AceStepConfig(**TINY)).decoder
    for p in dec.parameters():
        nn.init.normal_(p, std=0.05)
    dec = dec.to(dtype).requires_grad_(False)
    ref_dec = copy.deepcopy(dec)
    cfg = TrainConfig(rank=4, alpha=8.0, dropout=dropout, target_mlp=True).validate()
    adapter = inject_adapter(dec, cfg)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    conf = LoraConfig(r=4, lora_alpha=8.0, lora_dropout=dropout, target_modules=list(adapter.targets), bias="none")
    ref = get_peft_model(ref_dec, conf)
    set_peft_model_state_dict(ref, adapter.state_dict())
    for p in ref.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return adapter, ref_dec


def _inputs(dtype):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(B, FRAMES, 64, generator=g).to(dtype),
                timestep=torch.rand(B, generator=g).to(dtype), timestep_r=torch.rand(B, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(B, COND, 64, generator=g).to(dtype),
                context_latents=torch.randn(B, FRAMES, 128, generator=g).to(dtype))


def _run(dec, inputs, seed=5, autocast=False):
    dec.train()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = dec(**inputs)
    out.float().square().mean().backward()
    grads = {n.replace(".default", ""): p.grad.clone() for n, p in dec.named_parameters() if p.requires_grad}
    for p in dec.parameters():
        p.grad = None
    return out.detach().float(), grads


def _assert_close(a, b, tol):
    assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item()), (a - b).abs().max()


def _compare(ours, ref, tol):
    _assert_close(ours[0], ref[0], tol)
    assert ours[1].keys() == ref[1].keys() and ours[1]
    for name in ref[1]:
        _assert_close(ours[1][name], ref[1][name], tol)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_dropout_zero_equals_peft(ratio):
    adapter, ref = _pair()
    dec = adapter.module.decoder
    dec.checkpoint_ratio = ref.checkpoint_ratio = ratio
    inputs = _inputs(torch.float32)
    _compare(_run(dec, inputs), _run(ref, inputs), 1e-6)


def test_bf16_autocast_matches_peft():
    adapter, ref = _pair(dtype=torch.bfloat16)
    inputs = _inputs(torch.bfloat16)
    _compare(_run(adapter.module.decoder, inputs, autocast=True), _run(ref, inputs, autocast=True), 2e-2)


def _replayed_masks(seed, p):
    """The masks the lean forward draws, in its order: per layer one for q‖k‖v (layer input), o, cross q (its input),
    cross k‖v (the condition), cross o, then gate, up, down of the MLP. The mask takes its input's memory layout:
    every input is contiguous (the residual stream is made contiguous after the patch convolution)."""
    t, h, inner = FRAMES // 2, TINY["hidden_size"], TINY["intermediate_size"]
    plain = lambda *s: lambda: torch.ones(B, *s)  # noqa: E731
    residual = plain(t, h)
    draws = [residual, plain(t, h), residual, plain(COND, h), plain(t, h), residual, residual, plain(t, inner)]
    torch.manual_seed(seed)
    return [[fast_lora.dropout(make(), p) for make in draws] for _ in range(TINY["num_hidden_layers"])]


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_shared_dropout_mask_equals_peft_with_the_same_masks(ratio):
    adapter, ref = _pair(dropout=0.1)
    dec = adapter.module.decoder
    dec.checkpoint_ratio = ratio
    masks = _replayed_masks(5, 0.1)
    for i, layer in enumerate(ref.layers):
        m = masks[i]
        slots = {"self_attn.q_proj": m[0], "self_attn.k_proj": m[0], "self_attn.v_proj": m[0], "self_attn.o_proj": m[1],
                 "cross_attn.q_proj": m[2], "cross_attn.k_proj": m[3], "cross_attn.v_proj": m[3],
                 "cross_attn.o_proj": m[4], "mlp.gate_proj": m[5], "mlp.up_proj": m[6], "mlp.down_proj": m[7]}
        for name, mask in slots.items():
            layer.get_submodule(name).lora_dropout["default"] = FixedMask(mask)
    inputs = _inputs(torch.float32)
    ours = _run(dec, inputs, seed=5)
    _compare(ours, _run(ref, inputs), 1e-6)
    if ratio:  # the recomputation reproduced the forward's masks: same gradients as without checkpointing
        dec.checkpoint_ratio = 0.0
        _compare(_run(dec, inputs, seed=5), ours, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the matmul attention op where supported
def test_selective_checkpointing_gives_the_same_gradients(dtype):
    adapter, _ = _pair(dropout=0.1, dtype=dtype)
    dec = adapter.module.decoder
    inputs = _inputs(dtype)
    autocast = dtype == torch.bfloat16
    plain = _run(dec, inputs, autocast=autocast)
    dec.checkpoint_ratio, dec.checkpoint_selective = 1.0, True
    _compare(_run(dec, inputs, autocast=autocast), plain, 1e-6)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_rate_and_scale(p):
    x = torch.ones(201, 999, dtype=torch.bfloat16)  # an odd count: the last draw's second half is unused
    y = fast_lora.dropout(x, p)
    dropped = (y == 0).float().flatten()
    # Elements come two to a 32-bit draw (its low and its high 16 bits): each half alone must drop at the rate.
    for half in (dropped[0::2], dropped[1::2]):
        assert abs(half.mean().item() - p) < 0.006
    assert torch.equal(y[y != 0], (x * (1 / (1 - p)))[y != 0])
