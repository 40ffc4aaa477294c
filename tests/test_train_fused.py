"""The optimizer step fused into backward (``fused_backward``, sidestep_core.training.fused): the same weights as the
normal step for every optimizer it takes, bit-exact resume, per-tensor clipping, the loss check before backward,
and the settings it refuses."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sidestep_core.config import TrainConfig
from sidestep_core.device.plan import can_fuse
from sidestep_core.training import NonFiniteLossError, train
from sidestep_core.training.adapters import find_adapter
from sidestep_core.training.fused import FusedBackward
from train_helpers import fast_config, make_cache, single_thread, stop_after  # noqa: F401


@pytest.fixture(scope="module")
def three_clips(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("fused") / "cache", frames=(40, 56, 48), cond_len=(6, 9, 7), seed=1)


def _weights(folder):
    return load_file(str(find_adapter(folder)[1]))


# Dropout, CFG dropout, crops, padding, weight decay, warmup + cosine and EMA all on; max_grad_norm far above the
# gradient norm, so clipping (global in one path, per tensor in the other) changes nothing.
def _cfg(**kw) -> TrainConfig:
    return fast_config(dropout=0.1, cfg_ratio=0.5, batch_size=2, crop_seconds=1.2, scheduler="cosine", warmup_steps=2,
                       max_steps=6, learning_rate=5e-3, weight_decay=0.1, max_grad_norm=1e6, ema_decay=0.9, **kw)


@pytest.mark.parametrize("opt", ["adamw", "adamw8bit", "adafactor"])
def test_fused_backward_gives_the_normal_steps_weights(tiny_original, three_clips, tmp_path, opt):
    cfg = _cfg(optimizer=opt)
    normal = train(cfg, tiny_original, three_clips, tmp_path / "normal")
    fused = train(cfg.replace(fused_backward=True), tiny_original, three_clips, tmp_path / "fused")
    # CPU, fp32: each tensor gets the very update it gets in a normal step, so equality is exact
    assert fused.losses == normal.losses
    for sub in ("final", "final/ema"):
        a, b = _weights(tmp_path / "normal" / sub), _weights(tmp_path / "fused" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_fused_resume_is_bit_exact(tiny_original, three_clips, tmp_path):
    """6 steps in one go == 3 steps, a stop, then --resume auto; the warm-up passes (estimate_steps) run with the
    hooks only freeing gradients, so they change nothing either."""
    cfg = _cfg(fused_backward=True, estimate_steps=2)
    full = train(cfg, tiny_original, three_clips, tmp_path / "full")
    part = train(cfg, tiny_original, three_clips, tmp_path / "split", should_stop=stop_after(3))
    assert part.status == "stopped" and part.step == 3
    rest = train(cfg.replace(resume="auto"), tiny_original, three_clips, tmp_path / "split")
    assert rest.step == 6 and part.losses + rest.losses == full.losses
    for sub in ("final", "final/ema"):
        a, b = _weights(tmp_path / "full" / sub), _weights(tmp_path / "split" / sub)
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def test_a_normal_checkpoint_resumes_fused(tiny_original, three_clips, tmp_path):
    """The optimizer state is the normal one: a run may switch fused_backward on at a resume (to fit a smaller
    card) and continue exactly as the normal run would have."""
    cfg = _cfg()
    full = train(cfg, tiny_original, three_clips, tmp_path / "full")
    train(cfg, tiny_original, three_clips, tmp_path / "switch", should_stop=stop_after(3))
    rest = train(cfg.replace(fused_backward=True, resume="auto"), tiny_original, three_clips, tmp_path / "switch")
    assert rest.losses == full.losses[3:]
    a, b = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "switch" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fused_backward_over_a_quantized_offloaded_base(tiny_original, three_clips, tmp_path):
    cfg = _cfg(precision="bf16", base_precision="nf4", offload_layers="2").replace(max_steps=3)
    normal = train(cfg, tiny_original, three_clips, tmp_path / "normal")
    fused = train(cfg.replace(fused_backward=True), tiny_original, three_clips, tmp_path / "fused")
    assert fused.losses == normal.losses
    a, b = _weights(tmp_path / "normal" / "final"), _weights(tmp_path / "fused" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_tensor_is_clipped_on_its_own_and_the_logged_norm_is_global():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([a, b], lr=1.0)
    fused = FusedBackward([a, b], opt, max_grad_norm=1.0)
    ga, gb = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.1, 0.2, 0.2, 0.0])  # norms 5 and 0.3
    ((a * ga).sum() + (b * gb).sum()).backward()
    assert a.grad is None and b.grad is None  # applied and freed during backward
    assert torch.allclose(a.detach(), -ga / 5, atol=1e-6)  # clipped to norm 1 (up to clipping's 1e-6 epsilon)
    assert torch.equal(b.detach(), -gb)  # under the limit: untouched by the other tensor's size
    assert fused.take_norm().item() == pytest.approx((25 + 0.09) ** 0.5)
    fused.remove()


def test_a_non_finite_loss_updates_nothing(tiny_original, three_clips, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan.*checkpoints/step_\d"):
        train(fast_config(learning_rate=1e6, max_steps=8, save_every=1, fused_backward=True), tiny_original,
              three_clips, out)
    assert not (out / "final").exists()


@pytest.mark.parametrize("change,match", [
    ({"gradient_accumulation": 2}, "fused_backward: .*gradient_accumulation 1"),
    ({"optimizer": "prodigy"}, "fused_backward: optimizer prodigy"),
    ({"precision": "fp16"}, "fused_backward: precision fp16"),
    ({"train_models": "both"}, "fused_backward: .*train_models both"),
])
def test_settings_it_cannot_do_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(fused_backward=True, **change).validate()
    assert not can_fuse(TrainConfig(**change))  # and memory auto never picks it for them


def test_memory_auto_never_fuses_several_processes(monkeypatch):
    assert can_fuse(TrainConfig())
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not can_fuse(TrainConfig())
