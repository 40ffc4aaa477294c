"""The planner LM's memory plan (sidestep_core.device.plan_lm) against measured peaks of real CPU steps of the tiny
LM, and ``sidestep plan`` for runs that train the LM."""

from __future__ import annotations

import pytest
import torch

from sidestep_core.config import TrainConfig
from sidestep_core.device.measure import cpu_peak_bytes, tensor_bytes
from sidestep_core.device.plan_lm import estimate_lm, joint_peak, load_dtype, longest_sequence
from train_helpers import single_thread  # noqa: F401


def measured(lm_path, cfg: TrainConfig, tokens: int, labelled: int) -> int:
    """Peak CPU bytes of a real LM training step as the loop runs it: resident tensors (frozen LM, LoRA, optimizer
    state after a first step) + the peak of what one micro-batch's forward and backward allocate."""
    from sidestep_core.planner.lm_adapter import inject_lm_lora
    from sidestep_core.planner.loading import load_planner
    from sidestep_core.planner.training import IGNORE, lm_loss
    from sidestep_core.training.optim import build_optimizer

    dtype = load_dtype(cfg)
    planner = load_planner(lm_path, dtype=None if dtype == torch.float32 else dtype)
    torch.manual_seed(0)
    adapter = inject_lm_lora(planner.model, rank=cfg.lm_rank, alpha=cfg.lm_alpha, dropout=cfg.lm_dropout,
                             mlp=cfg.lm_target_mlp)
    if cfg.gradient_checkpointing:
        planner.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    planner.model.config.use_cache = False
    adapter.peft_model.train()
    optimizer = build_optimizer(adapter.parameters(), cfg)
    g = torch.Generator().manual_seed(1)
    b = cfg.batch_size
    ids = torch.randint(0, 150_000, (b, tokens), generator=g)
    mask = torch.ones(b, tokens, dtype=torch.long)
    labels = torch.full((b, tokens), IGNORE)
    labels[:, tokens - labelled:] = torch.randint(151_669, 215_669, (b, labelled), generator=g)

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = lm_loss(planner.model, ids, mask, labels)
        loss.backward()

    step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    resident = tensor_bytes([*planner.model.parameters(), *planner.model.buffers(), *state])
    return resident + cpu_peak_bytes(step)


@pytest.mark.parametrize("precision,checkpointing,mlp,loss,batch", [
    ("bf16", False, False, "codes", 2),
    ("bf16", True, False, "codes", 1),
    ("fp32", True, True, "codes_and_metadata", 2),
])
def test_lm_estimate_is_within_ten_percent_of_a_measured_cpu_step(tiny_with_lm, precision, checkpointing, mlp,
                                                                  loss, batch):
    cfg = TrainConfig(train_models="lm", lm=str(tiny_with_lm.planner), precision=precision, lm_rank=8,
                      gradient_checkpointing=checkpointing, lm_target_mlp=mlp, lm_loss=loss, batch_size=batch)
    plan = estimate_lm(tiny_with_lm.planner, cfg, frames=500, prompt_tokens=64)
    assert plan.settings["tokens"] == 64 + 100 + 1  # the prompt, a code per 5 frames and the end token
    real = measured(tiny_with_lm.planner, cfg, plan.settings["tokens"], plan.settings["labelled"])
    assert abs(plan.peak - real) / real <= 0.10, (plan.describe(), plan.peak, real)


def test_the_lm_weights_come_from_the_headers_at_the_load_dtype(tiny_with_lm):
    from sidestep_core.planner.loading import load_planner

    loaded = load_planner(tiny_with_lm.planner, dtype=torch.bfloat16)
    own = tensor_bytes([*loaded.model.parameters(), *loaded.model.buffers()])
    cfg = TrainConfig(train_models="lm", lm=str(tiny_with_lm.planner), precision="bf16")
    assert estimate_lm(tiny_with_lm.planner, cfg, frames=50, prompt_tokens=8).weights == own


def test_a_joint_run_keeps_the_lm_gradients_through_the_dit_step(tiny_with_lm):
    from sidestep_core.device.plan import checkpoint_config, estimate

    cfg = TrainConfig(train_models="both", lm=str(tiny_with_lm.planner), precision="bf16", lm_rank=8)
    lm = estimate_lm(tiny_with_lm.planner, cfg, frames=100, prompt_tokens=16)
    dit = estimate(checkpoint_config(tiny_with_lm.dit), cfg, offload_layers=0, device="cpu", frames=100,
                   cond_tokens=16)
    assert joint_peak(None, lm) == lm.peak
    assert joint_peak(dit, lm) == (dit.weights + dit.adapter + lm.weights + lm.adapter
                                   + max(lm.step, lm.gradients + dit.step))
    assert joint_peak(dit, lm) >= max(dit.peak, lm.peak)


def test_plan_command_plans_the_lm(tiny_with_lm, capsys):
    from sidestep_core.cli import main

    lm = str(tiny_with_lm.planner)
    assert main(["plan", "--checkpoint", str(tiny_with_lm.dit), "--train-models", "both", "--lm", lm,
                 "--device", "cpu", "--free", "64"]) == 0
    out = capsys.readouterr().out
    assert "planner LM: " in out and "both: " in out and "songs of 240 s (assumed" in out
    assert main(["plan", "--checkpoint", str(tiny_with_lm.dit), "--train-models", "both", "--lm", lm,
                 "--device", "cpu", "--free", "0.01"]) == 1
    assert "does not fit; no DiT setting fits beside the LM: lower batch_size or lm_rank" in capsys.readouterr().out
    assert main(["plan", "--train-models", "lm", "--lm", lm, "--device", "cpu", "--free", "0.01"]) == 1
    out = capsys.readouterr().out
    assert "plan: planner LM:" in out and "does not fit" in out and "decoder" not in out


# ----------------------------------------------------------------------------------------------------------
# the check `train` runs before loading (device.plan.settle) with the planner LM
# ----------------------------------------------------------------------------------------------------------


def settle_with(monkeypatch, cfg: TrainConfig, free: int):
    """``settle`` on a device that reports ``free`` bytes free. A CPU reports none (the plan is only printed there),
    so the budget stands in for a GPU's free memory; everything else is the real plan of the tiny models."""
    from sidestep_core.device import plan as P

    monkeypatch.setattr(P, "free_memory", lambda device: free)
    said: list[str] = []
    return P.settle(cfg, torch.device("cpu"), lambda message, *_: said.append(message)), said


@pytest.fixture
def run_cfg(tiny_with_lm, tmp_path):
    from train_helpers import fast_config, make_cache

    return fast_config(train_models="both", lm=str(tiny_with_lm.planner), checkpoint=str(tiny_with_lm.dit),
                       dataset=str(make_cache(tmp_path / "ds")), lm_rank=4, lm_alpha=8.0)


def test_the_check_before_loading_counts_the_lm(run_cfg, monkeypatch):
    from sidestep_core.device.plan import CONDITION_TOKENS, GIB, checkpoint_config, estimate

    # the joint peak is the one `sidestep plan` prints: the same functions on the longest clip (56 frames), the
    # longest condition (9 tokens) and the LM's longest training sequence
    dit = estimate(checkpoint_config(run_cfg.checkpoint), run_cfg, offload_layers=0, device="cpu", frames=56,
                   cond_tokens=9)
    frames, prompt, cot = longest_sequence(run_cfg, CONDITION_TOKENS)
    lm = estimate_lm(run_cfg.lm, run_cfg, frames=frames, prompt_tokens=prompt, cot_tokens=cot)
    holding, said = settle_with(monkeypatch, run_cfg, 4 * GIB)
    assert holding.plan.peak == holding.plan.needed == joint_peak(dit, lm) > dit.peak
    assert holding.plan.lm_share == joint_peak(dit, lm) - dit.peak
    assert said[0].startswith("memory plan: bf16 base + planner LM: ") and "planner LM " in said[0]
    assert "cpu has 4.00 GiB free" in said[0]

    # room for the DiT's plan but not the joint one: the DiT alone trains, the joint run is refused, naming the LM
    between = (dit.needed + holding.plan.needed) // 2
    assert settle_with(monkeypatch, run_cfg.replace(train_models="dit"), between)[0].plan.fits
    with pytest.raises(ValueError, match=r"need about .* GiB \(the planner LM's share: .* GiB\) but cpu has .*no "
                                         r"base precision / offload of the DiT fits beside the planner LM.*lm_rank.*"
                                         r"train the LM in its own run"):
        settle_with(monkeypatch, run_cfg, between)
    # just short of the joint plan: the least change of the DiT's settings that fits beside the LM is named
    with pytest.raises(ValueError, match=r"smallest change that fits: fp8 base \+ planner LM: "):
        settle_with(monkeypatch, run_cfg, holding.plan.needed - 1)
    assert settle_with(monkeypatch, run_cfg, holding.plan.needed)[0].plan.fits


def test_memory_auto_chooses_the_dits_settings_beside_the_lm(run_cfg, monkeypatch):
    cfg = run_cfg.replace(memory="auto")
    joint = settle_with(monkeypatch, cfg, 4 * 2**30)[0].plan
    budget = joint.needed - 1  # bf16 fits the DiT alone, not beside the LM
    alone = settle_with(monkeypatch, cfg.replace(train_models="dit"), budget)[0]
    assert (alone.base_precision, alone.offload_layers) == ("bf16", 0)
    both, said = settle_with(monkeypatch, cfg, budget)
    assert (both.base_precision, both.offload_layers) != ("bf16", 0)
    assert both.plan.lm is not None and both.plan.needed <= budget and "+ planner LM" in said[0]
    with pytest.raises(ValueError, match=r"memory auto: nothing fits in .* beside the planner LM \(lower batch_size"):
        settle_with(monkeypatch, cfg, joint.lm.peak)


def test_an_lm_only_run_is_checked_too(run_cfg, monkeypatch):
    from sidestep_core.device.plan_lm import lm_needed

    cfg = run_cfg.replace(train_models="lm", checkpoint="")
    frames, prompt, cot = longest_sequence(cfg, 512)
    lm = estimate_lm(cfg.lm, cfg, frames=frames, prompt_tokens=prompt, cot_tokens=cot)
    holding, said = settle_with(monkeypatch, cfg, lm_needed(lm, "cpu"))
    assert holding is None and said[0].startswith("memory plan: planner LM: ") and "cpu has" in said[0]
    with pytest.raises(ValueError, match=r"training the planner LM needs about .* but cpu has .* lower batch_size or "
                                         r"lm_rank, or shorten the longest song"):
        settle_with(monkeypatch, cfg, lm_needed(lm, "cpu") - 1)


def test_the_lm_plan_takes_the_datasets_longest_training_sequence(tiny_with_lm, tmp_path, monkeypatch, capsys):
    """A long lyric makes a shorter song the LM's longest sequence, longer than the longest song with a 512-token
    prompt: the check before loading and ``sidestep plan --dataset`` plan exactly the tokens training feeds."""
    from sidestep_core.cli import main
    from sidestep_core.device.plan import CONDITION_TOKENS, GIB
    from sidestep_core.planner.training import build_planner_training
    from sidestep_core.training.data import open_dataset
    from sidestep_core.training.optim import new_schedule
    from train_helpers import fast_config, make_cache

    lyric = "[verse]\n" + "\n".join(f"line {i}: the tide rolls in and the harbour lights are low" for i in range(60))
    ds = make_cache(tmp_path / "ds", frames=(56, 40), metadata=[
        {"caption": "tst, short piano piece", "lyrics": "[Instrumental]"},
        {"caption": "tst, slow ballad", "lyrics": lyric, "bpm": "80", "keyscale": "A minor"}])
    cfg = fast_config(train_models="both", lm=str(tiny_with_lm.planner), checkpoint=str(tiny_with_lm.dit),
                      dataset=str(ds), lm_rank=4, lm_alpha=8.0)

    # what training feeds the LM: the real sequences (prompt, CoT, the codes of the audio tokenizer, end token)
    training = build_planner_training(cfg, open_dataset(ds), torch.device("cpu"), None, new_schedule(cfg, 1),
                                      seed=0, say=lambda message: None)
    longest = max(len(s.ids) for s in training.sequences)
    frames, prompt, _ = longest_sequence(cfg, CONDITION_TOKENS)
    assert frames == 40 and prompt > CONDITION_TOKENS  # the long lyric's clip, not the longest song

    holding, said = settle_with(monkeypatch, cfg, 4 * GIB)
    lm = holding.plan.lm
    assert lm.settings["tokens"] == longest and lm.settings["prompt_tokens"] == prompt
    assumed = estimate_lm(cfg.lm, cfg, frames=56, prompt_tokens=CONDITION_TOKENS)  # the longest song, 512 tokens
    assert longest > assumed.settings["tokens"] and lm.step > assumed.step
    assert f"for 1 × {longest} tokens ({prompt} of prompt)" in said[0]
    alone = settle_with(monkeypatch, cfg.replace(train_models="lm", checkpoint=""), 4 * GIB)[1]
    assert f"for 1 × {longest} tokens ({prompt} of prompt)" in alone[0]

    assert main(["plan", "--checkpoint", cfg.checkpoint, "--train-models", "both", "--lm", cfg.lm, "--dataset",
                 str(ds), "--device", "cpu", "--free", "64"]) == 0
    out = capsys.readouterr().out
    assert (f"songs of 1.6 s (the dataset's longest training sequence; the LM trains on whole songs), {prompt} "
            "prompt tokens") in out
    assert f"for 1 × {longest} tokens ({prompt} of prompt)" in out


def test_the_lm_plan_counts_the_cots_own_tokens_with_a_loss_on_metadata(run_cfg, monkeypatch):
    """``lm_loss`` codes_and_metadata trains the CoT too: the plan counts the tokens with a loss that training has
    (the longest sequence's codes, end token and its own CoT), not an assumed CoT length."""
    from sidestep_core.device.plan import GIB
    from sidestep_core.device.plan_lm import METADATA_TOKENS
    from sidestep_core.planner.training import IGNORE, build_planner_training
    from sidestep_core.training.data import open_dataset
    from sidestep_core.training.optim import new_schedule

    cfg = run_cfg.replace(lm_loss="codes_and_metadata")
    training = build_planner_training(cfg, open_dataset(cfg.dataset), torch.device("cpu"), None,
                                      new_schedule(cfg, 1), seed=0, say=lambda message: None)
    longest = max(training.sequences, key=lambda s: len(s.ids))
    labelled = sum(label != IGNORE for label in longest.labels)
    plan = settle_with(monkeypatch, cfg, 4 * GIB)[0].plan.lm
    assert plan.settings["tokens"] == len(longest.ids) and plan.settings["labelled"] == labelled
    codes_only = settle_with(monkeypatch, run_cfg, 4 * GIB)[0].plan.lm.settings["labelled"]
    assert labelled - codes_only != METADATA_TOKENS  # this CoT is not the assumed length
