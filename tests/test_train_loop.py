"""The training loop end to end on the tiny checkpoint: every adapter type overfits through the CLI, exact resume,
save on stop, NaN stop, strict resume, outputs, validation, optimizers and progress events."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sidestep_core.training import AdapterMismatchError, NonFiniteLossError, train
from sidestep_core.tiny import make_tiny_checkpoint
from sidestep_core.training.adapters import find_adapter
from sidestep_core.training.loop import _Trainer
from sidestep_core.training.optim import lr_factor
from train_helpers import fast_config, make_cache, run_cli, single_thread, stop_after  # noqa: F401


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("ds2") / "cache", frames=(40, 56), cond_len=(6, 9))


@pytest.fixture(scope="module")
def three_clips(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("ds3") / "cache", frames=(40, 56, 48), cond_len=(6, 9, 7), seed=1)


def _losses(out):
    with open(out / "loss.csv", newline="") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr", "loha", "oft"])
def test_cli_trains_every_adapter_type_and_the_loss_falls(tiny_original, two_clips, tmp_path, kind):
    out = tmp_path / "out"
    rc = run_cli("--checkpoint", str(tiny_original), "--dataset", str(two_clips), "--out", str(out),
                 "--adapter", kind, "--rank", "4", "--alpha", "4", "--dropout", "0", "--oft-block-size", "8",
                 "--precision", "fp32", "--learning-rate", "1e-2", "--scheduler", "constant", "--max-steps", "40",
                 "--save-every", "20", "--crop-seconds", "0", "--estimate-steps", "0", "--device", "cpu",
                 "--plain", *(["--no-tensorboard"] if kind != "lora" else []))
    assert rc == 0
    losses = _losses(out)
    assert len(losses) == 40
    first, last = statistics.mean(losses[:4]), statistics.mean(losses[-8:])
    assert last < 0.85 * first, (first, last)
    found, weights = find_adapter(out / "final")
    assert found == kind
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_20", "step_40"]
    assert (out / "training_config.json").is_file()
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    assert meta["sidestep_adapter"] == kind and meta["sidestep_steps"] == "40"
    assert meta["sidestep_status"] == "complete" and meta["sidestep_base_variant"] == "turbo"
    assert meta["sidestep_recommended_shift"] == "3.0" and meta["sidestep_recommended_steps"] == "8"
    assert meta["sidestep_trigger_tag"] == "tst" and len(meta["sidestep_base_identity"]) == 16
    assert len(json.loads(meta["sidestep_targets"])) == 32
    assert json.loads(meta["sidestep_training"])["adapter"] == kind
    if kind == "lora":
        events = list((out / "runs").glob("events.out.tfevents.*"))
        assert events, "no TensorBoard events"


def _final_tensors(out):
    _, weights = find_adapter(out / "final")
    return load_file(str(weights))


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_resume_reproduces_the_uninterrupted_run(tiny_original, three_clips, tmp_path, kind):
    """fp32 CPU: 6 steps in one go == 3 steps, a stop, then --resume auto. Dropout, CFG dropout, crops, padding,
    accumulation and a warmup+cosine schedule are all on, so every RNG and state has to come back."""
    cfg = fast_config(adapter=kind, dropout=0.1, cfg_ratio=0.5, batch_size=2, gradient_accumulation=2,
                      crop_seconds=1.2, scheduler="cosine", warmup_steps=2, max_steps=6, save_every=0,
                      learning_rate=5e-3, estimate_steps=2)
    full = train(cfg, tiny_original, three_clips, tmp_path / "full")
    assert full.status == "complete" and full.step == 6

    part = train(cfg, tiny_original, three_clips, tmp_path / "split", should_stop=stop_after(3))
    assert part.status == "stopped" and part.step == 3
    assert (tmp_path / "split" / "checkpoints" / "step_3").is_dir()
    with safe_open(str(find_adapter(tmp_path / "split" / "final")[1]), framework="pt") as f:
        assert f.metadata()["sidestep_status"] == "stopped" and f.metadata()["sidestep_steps"] == "3"
    rest = train(cfg.replace(resume="auto"), tiny_original, three_clips, tmp_path / "split")
    assert rest.status == "complete" and rest.step == 6
    assert part.losses + rest.losses == full.losses
    a, b = _final_tensors(tmp_path / "full"), _final_tensors(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert _losses(tmp_path / "split") == pytest.approx(_losses(tmp_path / "full"), rel=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_original, two_clips, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"step 4: loss is nan.*checkpoints/step_3"):
        train(fast_config(learning_rate=1e6, max_steps=8, save_every=1), tiny_original, two_clips, out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_2", "step_3"]
    assert not (out / "final").exists()


def test_resume_with_other_adapter_settings_fails_loudly(tiny_original, two_clips, tmp_path):
    out = tmp_path / "o"
    train(fast_config(max_steps=2), tiny_original, two_clips, out)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(AdapterMismatchError, match=r"trained with rank 4; these settings ask for rank 8\."):
        train(fast_config(max_steps=4, rank=8, resume="auto"), tiny_original, two_clips, out)
    with pytest.raises(AdapterMismatchError, match="loha adapter"):
        train(fast_config(max_steps=4, adapter="loha", resume="auto"), tiny_original, two_clips, out)
    other = make_tiny_checkpoint(tmp_path / "other", "original", "tiny", 1).root  # same shapes, other weights
    with pytest.raises(AdapterMismatchError, match=r"trained on another base model .*resume with the checkpoint the "
                                                   r"run started with"):
        train(fast_config(max_steps=4, resume="auto"), other, two_clips, out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    with pytest.raises(ValueError, match="already holds a training run"):
        train(fast_config(max_steps=4), tiny_original, two_clips, out)
    rc = run_cli("--checkpoint", str(tiny_original), "--dataset", str(two_clips), "--out", str(out),
                 "--rank", "8", "--resume", "auto", "--max-steps", "4", "--precision", "fp32", "--device", "cpu")
    assert rc == 2


def test_outputs_progress_and_pruning(tiny_original, two_clips, tmp_path):
    events = []
    out = tmp_path / "o"
    res = train(fast_config(max_steps=5, save_every=1, keep_checkpoints=2, estimate_steps=2, tensorboard=True,
                            histogram_every=2), tiny_original, two_clips, out, progress=events.append)
    assert res.status == "complete" and res.final_dir == out / "final"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4", "step_5"]
    assert sorted(p.name for p in (out / "final").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    kinds = [e["event"] for e in events]
    assert kinds.index("plan") < kinds.index("step") and kinds[-1] == "done"
    plan = next(e for e in events if e["event"] == "plan")
    assert plan["total_steps"] == 5 and plan["peak_memory_bytes"] > 0
    assert plan.get("seconds_per_step", 0) > 0 or plan["estimate_note"].startswith("cannot tell")  # a busy machine
    step = [e for e in events if e["event"] == "step"][-1]
    assert {"step", "total", "loss", "smoothed_loss", "lr", "steps_per_s", "eta_s", "grad_norm"} <= step.keys()
    assert step["step"] == 5 and step["total"] == 5
    conf = json.loads((out / "training_config.json").read_text())
    assert conf["config"]["max_steps"] == 5 and conf["model"]["variant"] == "turbo"
    state = json.loads((out / "checkpoints" / "step_5" / "training_state.json").read_text())
    assert state["complete"] and state["state"]["step"] == 5
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))  # no pickle anywhere
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "runs"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(acc.Tags()["scalars"])
    assert "train/timesteps" in acc.Tags()["histograms"]


def test_validation_loss_is_deterministic(tiny_original, three_clips, tmp_path):
    cfg = fast_config(val_split=0.34, max_steps=2).replace(checkpoint=str(tiny_original), dataset=str(three_clips),
                                                           out=str(tmp_path / "v"))
    trainer = _Trainer(cfg, None, None)
    trainer.setup()
    assert len(trainer.val_ds) == 1 and len(trainer.train_ds) == 2
    a, b = trainer._validate(), trainer._validate()
    assert a == b and a > 0
    res = train(cfg.replace(val_every=1), tiny_original, three_clips, tmp_path / "v2")
    assert res.val_loss is not None


def test_gradient_checkpointing_changes_nothing_but_memory(tiny_original, two_clips, tmp_path):
    on = train(fast_config(max_steps=3, dropout=0.1), tiny_original, two_clips, tmp_path / "on")
    off = train(fast_config(max_steps=3, dropout=0.1, gradient_checkpointing=False), tiny_original, two_clips,
                tmp_path / "off")
    assert on.losses == pytest.approx(off.losses, rel=1e-6)


def test_settings_that_change_nothing_in_this_run_are_said(tiny_original, two_clips, tmp_path):
    """Selective checkpointing with no layer checkpointed, an EMA start step with no EMA: said, not dropped silently;
    with a checkpointed layer, or an EMA, nothing is said."""
    said = []
    progress = lambda e: e["event"] == "log" and said.append(e["message"])  # noqa: E731
    cfg = fast_config(max_steps=1, selective_checkpointing=True, gradient_checkpointing=False, ema_start_step=3)
    train(cfg, tiny_original, two_clips, tmp_path / "a", progress=progress)
    assert ("selective_checkpointing changes nothing: no decoder layer is checkpointed (gradient_checkpointing off, "
            "checkpointing_ratio 1.0 of 4 layers, no offload)") in said
    assert "ema_start_step 3 changes nothing: no average is kept (ema_decay 0)" in said
    said.clear()
    train(cfg.replace(offload_layers="2", ema_decay=0.9), tiny_original, two_clips, tmp_path / "b", progress=progress)
    assert not [m for m in said if "changes nothing" in m]


@pytest.mark.parametrize("opt", ["adafactor", "prodigy", "adamw8bit"])
def test_other_optimizers(tiny_original, two_clips, tmp_path, opt):
    cfg = fast_config(optimizer=opt, max_steps=2, learning_rate=1.0 if opt == "prodigy" else 1e-3)
    try:
        import bitsandbytes  # noqa: F401
        have_bnb = True
    except Exception:
        have_bnb = False
    if opt == "adamw8bit" and not have_bnb:
        with pytest.raises(ValueError, match="bitsandbytes"):
            train(cfg, tiny_original, two_clips, tmp_path / opt)
        return
    res = train(cfg, tiny_original, two_clips, tmp_path / opt)
    assert res.status == "complete"
    res = train(cfg.replace(max_steps=3, resume="auto"), tiny_original, two_clips, tmp_path / opt)
    assert res.step == 3


def test_learning_rate_schedules():
    def f(s, kind, total=100, warm=10):
        return lr_factor(s, {"total": total, "warmup": warm, "anchor_step": warm, "anchor_progress": 0.0}, kind,
                         0.01, 4)

    assert [f(s, "cosine") for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10, "cosine") == pytest.approx(1.0) and f(99, "cosine") == pytest.approx(0.01, abs=2e-3)
    assert f(55, "linear") == pytest.approx(0.505)
    assert f(50, "constant_with_warmup") == 1.0 and f(0, "constant", warm=0) == 1.0
    restarts = [f(s, "cosine_restarts") for s in range(10, 100)]
    assert sum(1 for a, b in zip(restarts, restarts[1:]) if b > a + 0.5) == 3  # 4 cycles: 3 jumps back up


def test_ctrl_c_in_the_cli_saves_and_exits_130(tiny_original, two_clips, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidestep_core", "train", "--checkpoint", str(tiny_original), "--dataset",
         str(two_clips), "--out", str(out), "--rank", "4", "--max-steps", "100000", "--save-every", "0",
         "--precision", "fp32", "--crop-seconds", "0", "--estimate-steps", "0", "--no-tensorboard", "--plain",
         "--device", "cpu"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            csv_path = out / "loss.csv"
            if csv_path.exists() and len(csv_path.read_text().splitlines()) >= 4:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output[-3000:]
    steps = len(_losses(out))
    assert steps >= 3 and (out / "checkpoints" / f"step_{steps}").is_dir()
    with safe_open(str(find_adapter(out / "final")[1]), framework="pt") as f:
        assert f.metadata()["sidestep_status"] == "stopped" and f.metadata()["sidestep_steps"] == str(steps)
    assert "resume with --resume auto" in output
    assert (out / "loss.png").is_file()  # the CLI's run folder gets its loss chart too
