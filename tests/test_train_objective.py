"""The objective: timestep distributions, CFG dropout rate, masked loss, and batch 1 == the unmasked reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sidestep_core.model import AceStepConfig, AceStepModel
from sidestep_core.training.data import Item, collate
from sidestep_core.training.objective import (
    TURBO_SHIFT3_TIMESTEPS, Objective, apply_cfg_dropout, cfg_drop_mask, masked_mse, noisy_input, sample_timesteps,
)
from train_helpers import single_thread  # noqa: F401  (autouse fixture)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_discrete_timesteps_come_from_the_turbo_table_uniformly():
    t = sample_timesteps(16000, "discrete", -0.4, 1.0, _gen())
    values, counts = torch.unique(t, return_counts=True)
    assert torch.allclose(values, torch.tensor(sorted(TURBO_SHIFT3_TIMESTEPS)))
    assert (counts - 2000).abs().max() < 200


def test_continuous_is_the_models_sample_t_r():
    """t = max of two logit-normal draws (the model's own sample_t_r with r = t)."""
    mu, sigma, n = -0.4, 1.0, 40000
    t = sample_timesteps(n, "continuous", mu, sigma, _gen(1)).numpy()
    rng = np.random.default_rng(0)
    ref = np.maximum(*(1 / (1 + np.exp(-(rng.standard_normal((2, n)) * sigma + mu)))))
    assert np.abs(np.quantile(t, [0.1, 0.5, 0.9]) - np.quantile(ref, [0.1, 0.5, 0.9])).max() < 0.01
    single = sample_timesteps(n, "logit_normal", mu, sigma, _gen(2)).numpy()
    assert abs(np.median(single) - 1 / (1 + np.exp(-mu))) < 0.01  # median of a logit-normal = sigmoid(mu)
    u = sample_timesteps(n, "uniform", mu, sigma, _gen(3)).numpy()
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
    shifted = sample_timesteps(n, "logit_normal", 1.0, 0.5, _gen(4)).numpy()
    assert abs(np.median(shifted) - 1 / (1 + np.exp(-1.0))) < 0.01


def test_cfg_dropout_rate_and_replacement():
    drop = cfg_drop_mask(20000, 0.15, _gen())
    assert abs(drop.float().mean().item() - 0.15) < 0.01
    states = torch.randn(4, 5, 8)
    null = torch.randn(1, 1, 8)
    mask = torch.tensor([True, False, True, False])
    out = apply_cfg_dropout(states, mask, null)
    assert torch.equal(out[1], states[1]) and torch.equal(out[3], states[3])
    assert torch.equal(out[0], null[0].expand(5, 8)) and torch.equal(out[2], null[0].expand(5, 8))
    assert not cfg_drop_mask(1000, 0.0, _gen()).any()


def test_masked_loss_ignores_padding():
    pred, target = torch.randn(2, 10, 64), torch.randn(2, 10, 64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    ref = torch.cat([(pred[0] - target[0]).square().flatten(), (pred[1, :6] - target[1, :6]).square().flatten()])
    assert torch.allclose(masked_mse(pred, target, mask), ref.mean(), atol=1e-6)
    garbage = pred.clone()
    garbage[1, 6:] = 1e6
    assert torch.allclose(masked_mse(garbage, target, mask), ref.mean(), atol=1e-6)
    assert torch.equal(masked_mse(pred, target, torch.ones(2, 10, dtype=torch.bool)), F.mse_loss(pred, target))


@pytest.fixture(scope="module")
def tiny_decoder():
    torch.manual_seed(0)
    cfg = AceStepConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, sliding_window=8, text_hidden_dim=32,
                        num_lyric_encoder_hidden_layers=1, num_timbre_encoder_hidden_layers=1,
                        num_attention_pooler_hidden_layers=1, fsq_dim=64)
    model = AceStepModel(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def _sample(t, length, seed):
    g = torch.Generator().manual_seed(seed)
    return {"target_latents": torch.randn(t, 64, generator=g), "context_latents": torch.randn(t, 128, generator=g),
            "encoder_hidden_states": torch.randn(length, 64, generator=g),
            "encoder_attention_mask": torch.ones(length, dtype=torch.bool)}


@pytest.mark.parametrize("mode", ["continuous", "discrete"])
def test_batch_of_one_equals_the_unmasked_reference_exactly(tiny_decoder, mode):
    """The model's own loss: x_t = t·noise + (1−t)·x0, target noise − x0, F.mse_loss, r = t."""
    dec, null = tiny_decoder.decoder, tiny_decoder.null_condition_emb
    batch = collate([_sample(23, 7, 0)], [Item(0, 0, 23)])
    obj = Objective(mode, -0.4, 1.0, 0.5, null)
    loss, t = obj(dec, batch, _gen(5))
    g = _gen(5)  # the same draws in the documented order: t, CFG mask, noise
    t_ref = sample_timesteps(1, mode, -0.4, 1.0, g)
    drop = cfg_drop_mask(1, 0.5, g)
    noise = torch.randn(1, 23, 64, generator=g)
    x0 = batch.target_latents
    cond = null.expand_as(batch.encoder_hidden_states) if drop[0] else batch.encoder_hidden_states
    xt = t_ref[:, None, None] * noise + (1 - t_ref[:, None, None]) * x0
    pred = dec(hidden_states=xt, timestep=t_ref, timestep_r=t_ref, encoder_hidden_states=cond,
               context_latents=batch.context_latents)
    assert torch.equal(t, t_ref)
    assert torch.equal(loss, F.mse_loss(pred, noise - x0))


def test_padded_batch_loss_counts_only_real_frames(tiny_decoder):
    dec, null = tiny_decoder.decoder, tiny_decoder.null_condition_emb
    batch = collate([_sample(20, 5, 1), _sample(12, 8, 2)], [Item(0, 0, 20), Item(1, 0, 12)])
    assert batch.frame_mask.sum().item() == 32 and batch.encoder_attention_mask.sum().item() == 13
    obj = Objective("uniform", 0.0, 1.0, 0.0, null)
    loss, t = obj(dec, batch, _gen(9))
    g = _gen(9)
    t_ref = sample_timesteps(2, "uniform", 0.0, 1.0, g)
    noise = torch.randn(2, 20, 64, generator=g)
    xt, target = noisy_input(batch.target_latents, noise, t_ref)
    pred = dec(hidden_states=xt, timestep=t_ref, timestep_r=t_ref, encoder_hidden_states=batch.encoder_hidden_states,
               context_latents=batch.context_latents)
    err = (pred - target).square()
    ref = torch.cat([err[0].flatten(), err[1, :12].flatten()]).mean()
    assert torch.allclose(loss, ref, rtol=1e-6)
    assert not torch.allclose(loss, F.mse_loss(pred, target))  # upstream's average over padding differs


def test_bf16_rounds_t_as_the_released_pipeline_does(tiny_decoder):
    obj = Objective("continuous", -0.4, 1.0, 0.0, tiny_decoder.null_condition_emb, torch.bfloat16)
    batch = collate([_sample(10, 4, 3)], [Item(0, 0, 10)])
    _, t = obj(tiny_decoder.decoder, batch, _gen(0))
    assert torch.equal(t, t.to(torch.bfloat16).float())
