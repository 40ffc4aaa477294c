"""``TrainConfig.torch_compile``: the compiled decoder layers give the eager layers' outputs and adapter gradients
(LoRA with dropout, checkpointing on and off, sliding-window layers on their banded path)."""

from __future__ import annotations

import shutil

import pytest
import torch

from sidestep_core.config import TrainConfig
from sidestep_core.model import AceStepConfig, AceStepModel
from sidestep_core.training.adapters import inject_adapter
from train_helpers import single_thread  # noqa: F401

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="torch.compile (inductor) on CPU needs a C compiler")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, sliding_window=8, text_hidden_dim=32, num_lyric_encoder_hidden_layers=1,
            num_timbre_encoder_hidden_layers=1, num_attention_pooler_hidden_layers=1, fsq_dim=64)


def _decoder():
    torch.manual_seed(0)
    dec = AceStepModel(AceStepConfig(**TINY)).decoder
    for p in dec.parameters():
        torch.nn.init.normal_(p, std=0.05)
    dec.requires_grad_(False)
    adapter = inject_adapter(dec, TrainConfig(rank=4, alpha=8.0, dropout=0.1).validate())
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return dec.train()


def _step(dec, inputs):
    torch.manual_seed(5)  # same dropout masks
    out = dec(**inputs)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in dec.parameters() if p.requires_grad]
    dec.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_compiled_layers_match_eager(ratio):
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 40, 64, generator=g), timestep=torch.rand(1, generator=g),
                  timestep_r=torch.rand(1, generator=g), encoder_hidden_states=torch.randn(1, 7, 64, generator=g),
                  context_latents=torch.randn(1, 40, 128, generator=g))
    dec = _decoder()
    dec.checkpoint_ratio = ratio
    eager = _step(dec, inputs)
    dec.compile_layers()
    with torch._inductor.config.patch(fallback_random=True):  # eager's dropout masks, to compare exactly
        compiled = _step(dec, inputs)
    assert (compiled[0] - eager[0]).abs().max() < 1e-5
    for c, e in zip(compiled[1], eager[1]):
        assert (c - e).abs().max() < 1e-5 * max(1.0, e.abs().max().item())
