"""The memory plan (sidestep_core.device.plan) against measured peaks of real CPU steps, and ``sidestep plan``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sidestep_core.config import TrainConfig
from sidestep_core.device.measure import RandomStep
from sidestep_core.device.plan import CUDA_RESERVED, GIB, estimate, fit_on_card, weight_bytes
from sidestep_core.device.shapes import real_shape
from sidestep_core.model.config import AceStepConfig
from sidestep_core.presets import VRAM_TIERS, load_preset
from sidestep_core.tiny.profiles import get_profile
from train_helpers import single_thread  # noqa: F401

SCALED = AceStepConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, sliding_window=32, text_hidden_dim=64)


def measured(config: AceStepConfig, cfg: TrainConfig, bp: str, frames: int, cond: int) -> int:
    """Peak CPU bytes of a real training step: resident tensors (frozen base, adapter, optimizer state after a first
    step) + the peak of what the step allocates, from the profiler's allocator events."""
    step = RandomStep.build(config, cfg, bp, frames, cond)
    step.update()
    return step.peak_bytes()


CASES = [
    ("tiny", "bf16", "lora", 200, 12, "adamw"),
    ("tiny", "nf4", "lokr", 200, 12, "adamw"),
    ("scaled", "bf16", "lora", 600, 64, "adamw"),
    ("scaled", "fp8", "lora", 600, 64, "adamw"),
    ("scaled", "int8", "oft", 600, 64, "adamw"),
    ("scaled", "nf4", "dora", 600, 64, "adamw"),
    ("scaled", "nf4", "lora", 600, 64, "adamw8bit"),  # the optimizer the low-memory rows of the README assume
    ("scaled", "nf4", "lora", 600, 64, "adamw8bit+fused"),  # gradients freed as they come (training.fused)
    ("scaled", "bf16", "lora", 600, 64, "adamw+fused"),
]


# The measured side once depended on what ran before in the process (up to 34 % low): the profiler's CPU reporter
# kept stale block sizes from earlier sessions (see device.measure.cpu_peak_bytes).
@pytest.mark.parametrize("shape,bp,kind,frames,cond,optimizer", CASES)
def test_estimate_is_within_ten_percent_of_a_measured_cpu_step(shape, bp, kind, frames, cond, optimizer):
    config = get_profile("tiny").dit if shape == "tiny" else SCALED
    optimizer, _, fused = optimizer.partition("+")
    # bitsandbytes keeps 8-bit state only for tensors of >= 4096 values; at r64 every LoRA factor is (as at the
    # real shapes, where the plan's 2 bytes per parameter hold)
    rank = 64 if optimizer == "adamw8bit" else 8
    cfg = TrainConfig(adapter=kind, rank=rank, alpha=rank, precision="bf16", oft_block_size=8, target_mlp=True,
                      optimizer=optimizer, fused_backward=bool(fused))
    plan = estimate(config, cfg, base_precision=bp, offload_layers=0, device="cpu", cond_tokens=cond, frames=frames)
    real = measured(config, cfg, bp, frames, cond)
    assert plan.slack == 0
    assert abs(plan.peak - real) / real <= 0.10, (plan.describe(), plan.peak, real)


def test_fused_backward_plans_one_layers_gradients_instead_of_all():
    """At XL with rank 64 the adapter's fp32 gradients are 0.31 GiB: fused, the step keeps only those of the layer
    backward is in. It is what closes issue 12's XL nf4 target (peak <= 3 GiB, AdamW8bit)."""
    cfg = TrainConfig(rank=64, alpha=64, optimizer="adamw8bit")
    xl = real_shape("xl")
    normal = estimate(xl, cfg, base_precision="nf4")
    fused = estimate(xl, cfg.replace(fused_backward=True), base_precision="nf4")
    assert fused.weights == normal.weights and fused.adapter == normal.adapter
    assert 0.15 * GIB < normal.step - fused.step <= 4 * normal.trainable_params
    assert fused.peak <= 3 * GIB and fused.label == "nf4 base + fused backward"
    # memory auto turns it on where nothing else of the same precision fits, and never for accumulation
    card = fused.needed + (normal.needed - fused.needed) // 2 + CUDA_RESERVED  # between the two
    assert fit_on_card(xl, cfg.replace(base_precision="nf4"), card / GIB, cache={}).fused_backward
    chosen = fit_on_card(xl, cfg.replace(base_precision="nf4", gradient_accumulation=2), card / GIB, cache={})
    assert not chosen.fused_backward and chosen.offload_layers > 0


def test_weights_at_real_shapes():
    two_b, xl = real_shape("2b"), real_shape("xl")
    bf16 = weight_bytes(two_b, "bf16", torch.bfloat16)
    assert bf16 == 2 * 1_575_458_880 + 2 * 2048  # decoder + null_condition_emb
    assert 4.0e9 < (weight_bytes(xl, "bf16", torch.bfloat16) / 2) < 4.3e9
    assert weight_bytes(two_b, "fp8", torch.bfloat16) < 0.55 * bf16
    assert weight_bytes(two_b, "nf4", torch.bfloat16) < 0.32 * bf16
    # offload keeps two layers in flight
    layer = weight_bytes(two_b, "bf16", torch.bfloat16, 2) - weight_bytes(two_b, "bf16", torch.bfloat16, 3)
    assert layer == 2 * 62_933_504
    assert weight_bytes(two_b, "bf16", torch.bfloat16, 24) == bf16 - 22 * layer


def test_offload_needs_less_and_extrapolation_matches_full_depth():
    config = dataclasses.replace(SCALED, num_hidden_layers=8, layer_types=[])
    config.__post_init__()
    cfg = TrainConfig(rank=4, alpha=4, precision="bf16")
    full = cfg.replace(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # measured at full depth
    a = estimate(config, cfg, offload_layers=0, device="cpu", frames=300, cond_tokens=32)
    b = estimate(config, full, offload_layers=0, device="cpu", frames=300, cond_tokens=32)
    assert a.trainable_params == b.trainable_params
    # 2 % before the fused LoRA forward (training/fast_lora.py); with it the extrapolation from depth 2 and 4
    # overestimates the full 8-layer step by 2.8 % here. The estimator's accuracy against measured peaks is held to
    # 10 % by the tests below.
    assert abs(a.step - b.step) / b.step < 0.03
    off = estimate(config, cfg, offload_layers=8, device="cpu", frames=300, cond_tokens=32)
    assert off.weights < a.weights / 2 and off.peak < a.peak


def test_plan_command_prints_the_real_shape_table(capsys):
    from sidestep_core.cli import main

    assert main(["plan", "--shape", "2b", "--table", "--crop-seconds", "10"]) == 0
    out = capsys.readouterr().out
    for label in ("bf16", "fp8", "int8", "nf4", "offload"):
        assert label in out
    assert "GiB" in out and "fused backward off" in out
    assert main(["plan", "--shape", "2b", "--table", "--crop-seconds", "10", "--fused-backward"]) == 0
    out = capsys.readouterr().out
    assert "fused backward on" in out.splitlines()[0] and "nf4 base + fused backward " in out


def test_plan_refuses_fp16_on_the_cpu_as_training_does(capsys):
    from sidestep_core.cli import main

    args = ["plan", "--shape", "2b", "--crop-seconds", "10", "--precision", "fp16"]
    assert main([*args, "--device", "cpu"]) == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
    assert main([*args, "--device", "cuda", "--free", "64"]) == 0


def test_plan_refuses_and_names_the_smallest_change_that_fits(capsys):
    from sidestep_core.cli import main

    args = ["plan", "--shape", "2b", "--crop-seconds", "10", "--rank", "16"]
    assert main([*args, "--free", "64"]) == 0
    assert main([*args, "--free", "2.3"]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("does not fit"))
    assert "smallest change that fits: fp8 base:" in line  # bf16 needs ~3.6 GiB; fp8 is the least change
    assert main([*args, "--free", "1.2"]) == 1
    assert "offload" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(VRAM_TIERS))
def test_vram_presets_fit_their_card(name):
    """At the 2B shape each memory-tier preset fits its card as it is; at XL with a quantized base at most (no
    offload). The README's table of which settings fit which GPU is ``sidestep plan --tiers``."""
    cfg, card = load_preset(name), VRAM_TIERS[name]
    two_b = estimate(real_shape("2b"), cfg, device="cuda")
    assert two_b.needed <= card * GIB - CUDA_RESERVED, two_b.describe()
    xl = fit_on_card(real_shape("xl"), cfg, card, cache={})
    assert xl is not None and xl.offload_layers == 0, name


# ----------------------------------------------------------------------------------------------------------
# the dataset's shape: every plan made before loading, and `sidestep plan --dataset`
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def long_condition_run(tiny_original, tmp_path):
    from adapter_helpers import DIT
    from train_helpers import fast_config, make_cache

    # whole songs (crop 0): the plan must size the longest clip (90 frames) and the longest condition (700 tokens,
    # a long lyric), not the 240 s and 512 tokens assumed without a dataset
    ds = make_cache(tmp_path / "ds", frames=(40, 90), cond_len=(700, 9))
    return fast_config(checkpoint=str(tiny_original / DIT), dataset=str(ds), precision="bf16")


def settle_on(monkeypatch, cfg: TrainConfig, free: int):
    """``settle`` with ``free`` bytes free: a CPU reports none, so the budget stands in for a GPU's free memory."""
    from sidestep_core.device import plan as P

    monkeypatch.setattr(P, "free_memory", lambda device: free)
    said: list[str] = []
    return P.settle(cfg, torch.device("cpu"), lambda message, *_: said.append(message)), said


def test_every_plan_before_loading_sizes_the_datasets_largest_batch(long_condition_run, monkeypatch):
    from sidestep_core.device.plan import checkpoint_config, dataset_shape

    cfg = long_condition_run
    assert dataset_shape(cfg) == (90, 700)
    assert dataset_shape(cfg.replace(crop_seconds=2)) == (50, 700)  # the crop when it is shorter than the clip
    config = checkpoint_config(cfg.checkpoint)
    real = estimate(config, cfg, offload_layers=0, device="cpu", frames=90, cond_tokens=700)
    assumed = estimate(config, cfg, offload_layers=0, device="cpu")
    assert real.step != assumed.step

    def shape(plan):
        return plan.settings["frames"], plan.settings["cond_tokens"]

    plain = settle_on(monkeypatch, cfg, 4 * GIB)[0].plan
    assert shape(plain) == (90, 700) and plain.peak == real.peak
    for auto in ({"memory": "auto"}, {"offload_layers": "auto"}):  # the branches that choose settings
        assert shape(settle_on(monkeypatch, cfg.replace(**auto), 4 * GIB)[0].plan) == (90, 700), auto
    # refused: the needed memory and the smallest change named are the dataset's too
    with pytest.raises(ValueError, match=f"need about {real.needed / GIB:.2f} GiB"):
        settle_on(monkeypatch, cfg, real.needed - 1)
    with pytest.raises(ValueError, match=r"memory auto: nothing fits .*\(smallest: nf4 base"):
        settle_on(monkeypatch, cfg.replace(memory="auto"), 1)


def test_plan_command_takes_the_datasets_shape(long_condition_run, capsys):
    from sidestep_core.cli import main

    cfg = long_condition_run
    args = ["plan", "--checkpoint", cfg.checkpoint, "--dataset", cfg.dataset, "--device", "cpu", "--free", "64"]
    assert main(args) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "the dataset's largest micro-batch: 3.6 s, 700 condition tokens" in head
    assert main([*args, "--cond-tokens", "64", "--crop-seconds", "2"]) == 0
    assert "the dataset's largest micro-batch: 2 s, 64 condition tokens" in capsys.readouterr().out


def test_adamw8bit_state_is_what_bitsandbytes_allocates():
    """2 bytes per value of its two 8-bit states plus an fp32 absmax per 256 values of each (LoRA factors at the real
    shapes are above bitsandbytes' 4096-value minimum for 8-bit state)."""
    bnb = pytest.importorskip("bitsandbytes")
    from sidestep_core.device.plan import adapter_bytes

    p = torch.nn.Parameter(torch.randn(64, 2048))
    opt = bnb.optim.AdamW8bit([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    # the quantization maps (qmap1/2, 256 values each) are per tensor, not per value
    state = sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k.startswith(("state", "absmax")))
    assert adapter_bytes("adamw8bit", p.numel()) == 4 * p.numel() + state
