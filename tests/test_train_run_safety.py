"""A run survives a hostile folder and a failing machine, and tells the truth on resume: read-only and full output
folders, damaged or tampered training state, two trainings on one folder, leftovers of interrupted saves, file
modes, changed settings on resume, the time estimate and loss.png. Every hostile file is made here."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import stat
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from sidestep_core import fsutil
from sidestep_core.training import train
from sidestep_core.training.state import STATE_JSON, STATE_TENSORS, is_valid
from train_helpers import fast_config, make_cache, run_cli, single_thread, stop_after  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("ds2") / "cache", frames=(40, 56), cond_len=(6, 9))


def _args(ckpt, data, out, *extra):
    return ["--checkpoint", str(ckpt), "--dataset", str(data), "--out", str(out), "--rank", "4", "--alpha", "4",
            "--dropout", "0", "--precision", "fp32", "--learning-rate", "1e-2", "--scheduler", "constant",
            "--warmup-steps", "0", "--crop-seconds", "0", "--estimate-steps", "0", "--device", "cpu", "--plain",
            "--no-tensorboard", *map(str, extra)]


def _rows(out):
    with open(out / "loss.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _steps(out):
    return sorted(int(p.name[5:]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))


def _edit_state(folder: Path, edit) -> None:
    doc = json.loads((folder / STATE_JSON).read_text())
    edit(doc["state"])
    (folder / STATE_JSON).write_text(json.dumps(doc))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------------------------------------
# output folders the OS refuses
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/sys is Linux's read-only file system")
def test_read_only_output_folder_is_one_line_and_exit_2(tiny_original, two_clips, capsys):
    out = Path("/sys/sidestep-test-run/out")  # read-only even for root
    assert run_cli(*_args(tiny_original, two_clips, out, "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /sys/sidestep-test-run") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_output_under_a_file_is_one_line_and_exit_2(tiny_original, two_clips, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "run"
    assert run_cli(*_args(tiny_original, two_clips, out, "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'a_file'}") and err.count("\n") == 1, err


def test_a_folder_that_is_no_model_fails_early_and_leaves_no_output_folder(two_clips, tmp_path, capsys):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    out = tmp_path / "out"
    assert run_cli(*_args(folder, two_clips, out, "--max-steps", "2")) == 2
    assert "not an ACE-Step model" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/sys is Linux's read-only file system")
def test_export_into_a_read_only_folder_is_one_line_and_exit_2(tiny_original, two_clips, tmp_path, capsys):
    from sidestep_core.cli import main

    train(fast_config(max_steps=1), tiny_original, two_clips, tmp_path / "run")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run" / "final"), "--out", "/sys/sidestep-test.safetensors",
                 "--no-verify", "--checkpoint", str(tiny_original)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /sys/") and "Traceback" not in err and err.count("\n") == 1, err


def test_full_disk_during_a_checkpoint_keeps_the_last_good_one(tiny_original, two_clips, tmp_path, monkeypatch,
                                                               capsys):
    """ENOSPC from the write itself (the one place bytes reach the disk) while step 4's checkpoint is saved."""
    real_write = fsutil._write

    def write(path, data):
        if ".step_4." in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(fsutil, "_write", write)
    out = tmp_path / "o"
    assert run_cli(*_args(tiny_original, two_clips, out, "--max-steps", "6", "--save-every", "2")) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and ".step_4." in err and "Traceback" not in err
    assert _steps(out) == [2] and is_valid(out / "checkpoints" / "step_2")
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written folder
    assert not (out / "final").exists()
    monkeypatch.setattr(fsutil, "_write", real_write)
    assert run_cli(*_args(tiny_original, two_clips, out, "--max-steps", "6", "--save-every", "2",
                          "--resume", "auto")) == 0
    assert "resumed from" in capsys.readouterr().err and [r["step"] for r in _rows(out)] == list("123456")


def test_a_file_size_limit_during_a_checkpoint_names_the_file(tiny_original, two_clips, tmp_path):
    """A real failing write (RLIMIT_FSIZE: EFBIG from write(), as a full disk gives ENOSPC) carries no file name;
    the message names the file all the same, and the interrupted save leaves nothing behind."""
    out = tmp_path / "o"
    code = (
        "import resource, sys\n"
        "from sidestep_core.cli import main\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, resource.RLIM_INFINITY))\n"  # the adapter is 57 kB
        "sys.exit(main(['train', *sys.argv[1:]]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *_args(tiny_original, two_clips, out, "--max-steps", "2",
                                                               "--save-every", "1")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out / 'checkpoints'}/.step_1.tmp-") and last.endswith(
        "/adapter_model.safetensors: file too large"), last
    assert "Traceback" not in proc.stderr
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())


# ----------------------------------------------------------------------------------------------------------
# damaged and tampered training state
# ----------------------------------------------------------------------------------------------------------


def _moment_key(folder: Path) -> str:
    return next(k for k in load_file(str(folder / STATE_TENSORS)) if k.endswith(".exp_avg"))


def _wrong_moment_shape(folder: Path) -> None:
    tensors = load_file(str(folder / STATE_TENSORS))
    key = _moment_key(folder)
    tensors[key] = tensors[key][:, :3].contiguous()
    save_file(tensors, str(folder / STATE_TENSORS), {"format": "sidestep-training-state"})


TAMPERING = {
    "step is not a number": (lambda f: _edit_state(f, lambda s: s.update(step="three")), "step is 'three'"),
    "step of 10^12": (lambda f: _edit_state(f, lambda s: s.update(step=10**12)), "step 1000000000000 in a folder"),
    "broken RNG state": (lambda f: _edit_state(f, lambda s: s["rng"][0].update(python=[3, [1, 2], None])),
                         "unusable RNG state"),
    "moment of the wrong shape": (_wrong_moment_shape, "has shape (4, 3)"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_original, two_clips, tmp_path, capsys,
                                                                     case):
    damage, reason = TAMPERING[case]
    out = tmp_path / "o"
    train(fast_config(max_steps=4, save_every=2, keep_checkpoints=0), tiny_original, two_clips, out)
    damage(out / "checkpoints" / "step_4")
    capsys.readouterr()
    assert run_cli(*_args(tiny_original, two_clips, out, "--max-steps", "5", "--resume", "auto")) == 0
    err = capsys.readouterr().err
    assert f"skipping {out / 'checkpoints' / 'step_4'}: damaged training state" in err and reason in err, err
    assert f"resumed from {out / 'checkpoints' / 'step_2'} at step 2" in err
    assert [r["step"] for r in _rows(out)] == list("12345")


def _nan_weights(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * float("nan")
    save_file(tensors, str(path))


ADAPTER_DAMAGE = {
    "truncated weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(
        (f / "adapter_model.safetensors").read_bytes()[:100]), "adapter_model.safetensors: cannot read adapter weights"),
    "weights deleted": (lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter found"),
    "config not JSON": (lambda f: (f / "adapter_config.json").write_text("{"), "unreadable PEFT adapter config"),
    "NaN weights": (_nan_weights, "holds NaN or infinite values"),
}


@pytest.mark.parametrize("case", list(ADAPTER_DAMAGE))
def test_a_checkpoint_with_damaged_adapter_files_is_skipped_like_damaged_state(tiny_original, two_clips, tmp_path,
                                                                                capsys, case):
    """Resume loads the checkpoint's adapter files too: a damaged one (a failing disk, a hand edit) makes
    ``--resume auto`` fall back to the previous checkpoint instead of ending the run."""
    damage, reason = ADAPTER_DAMAGE[case]
    out = tmp_path / "o"
    train(fast_config(max_steps=4, save_every=2, keep_checkpoints=0), tiny_original, two_clips, out)
    damage(out / "checkpoints" / "step_4")
    assert not is_valid(out / "checkpoints" / "step_4") and is_valid(out / "checkpoints" / "step_2")
    capsys.readouterr()
    assert run_cli(*_args(tiny_original, two_clips, out, "--max-steps", "5", "--resume", "auto")) == 0
    err = capsys.readouterr().err
    assert f"skipping {out / 'checkpoints' / 'step_4'}: " in err and reason in err, err
    assert f"resumed from {out / 'checkpoints' / 'step_2'} at step 2" in err
    assert [r["step"] for r in _rows(out)] == list("12345")


def test_only_damaged_checkpoints_exit_2_with_a_message(tiny_original, two_clips, tmp_path, capsys):
    out = tmp_path / "o"
    train(fast_config(max_steps=2, save_every=1, keep_checkpoints=0), tiny_original, two_clips, out)
    for step in (1, 2):
        TAMPERING["step is not a number"][0](out / "checkpoints" / f"step_{step}")
    final_before = sorted(p.name for p in (out / "final").iterdir())
    capsys.readouterr()
    assert run_cli(*_args(tiny_original, two_clips, out, "--max-steps", "4", "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert "no checkpoint there can be resumed from" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "final").iterdir()) == final_before


def test_a_step_beyond_the_run_trains_nothing_and_writes_no_adapter(tiny_original, two_clips, tmp_path, capsys):
    """A checkpoint folder and state both saying step 10^12: refused, and no "done" adapter appears."""
    out = tmp_path / "o"
    train(fast_config(max_steps=2, save_every=2), tiny_original, two_clips, out)
    huge = out / "checkpoints" / f"step_{10**12}"
    (out / "checkpoints" / "step_2").rename(huge)
    _edit_state(huge, lambda s: s.update(step=10**12))
    import shutil

    shutil.rmtree(out / "final")
    capsys.readouterr()
    assert run_cli(*_args(tiny_original, two_clips, out, "--max-steps", "6", "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert f"is at step {10**12}, beyond this run's 6 steps" in err
    assert not (out / "final").exists()


# ----------------------------------------------------------------------------------------------------------
# one run per folder; leftovers of interrupted saves; file modes
# ----------------------------------------------------------------------------------------------------------


def test_a_second_training_on_the_same_folder_is_refused_and_a_killed_holder_does_not_block(
        tiny_original, two_clips, tmp_path, capsys):
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sidestep_core.fsutil import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_cli(*_args(tiny_original, two_clips, out, "--max-steps", "2")) == 2
        err = capsys.readouterr().err
        assert f"error: {out}: another training run is already using this folder (process {holder.pid})" in err
        assert not (out / "checkpoints").exists()
        # the same from the core API (what the ComfyUI node calls), even within one process
        with fsutil.RunLock(tmp_path / "p"):
            with pytest.raises(fsutil.FolderBusyError, match="already using this folder"):
                train(fast_config(max_steps=1), tiny_original, two_clips, tmp_path / "p")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / fsutil.LOCK_NAME).exists()  # the stale lock file stays; the OS lock died with its process
    assert run_cli(*_args(tiny_original, two_clips, out, "--max-steps", "2")) == 0


def test_leftovers_of_interrupted_saves_are_cleaned_on_the_next_run(tiny_original, two_clips, tmp_path, capsys):
    out = tmp_path / "o"
    train(fast_config(max_steps=2, save_every=2), tiny_original, two_clips, out)
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        stale = [out / "checkpoints" / f".step_3.tmp-{dead}", out / f".final.tmp-{dead}",
                 out / f".final.old-{dead}"]
        for d in stale:
            d.mkdir()
            (d / "adapter_model.safetensors").write_bytes(b"half")
        stale_files = [out / f".training_config.json.tmp-{dead}-0a1b2c3d", out / ".loss.csv.k2j3h4x_.tmp"]
        for f in stale_files:
            f.write_bytes(b"half")
        alive = out / f".final.tmp-{live.pid}"
        alive.mkdir()
        assert run_cli(*_args(tiny_original, two_clips, out, "--max-steps", "3", "--resume", "auto")) == 0
        for p in stale + stale_files:
            assert not p.exists(), p
        assert alive.is_dir()  # another living process's: not ours to remove
        assert f"removed {stale[0]} (left by an interrupted save)" in capsys.readouterr().err
    finally:
        live.kill()
        live.wait()


def test_files_respect_the_umask(tiny_original, two_clips, tmp_path):
    from sidestep_core.cli import main

    old = os.umask(0o022)
    try:
        out = tmp_path / "o"
        train(fast_config(max_steps=2, save_every=1), tiny_original, two_clips, out)
        assert main(["export", str(out / "final"), "--out", str(tmp_path / "x.safetensors"), "--no-verify"]) == 0
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()] + [tmp_path / "x.safetensors"]
    assert len(files) > 8
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, (p, oct(p.stat().st_mode))
    for p in [out, *[d for d in out.rglob("*") if d.is_dir()]]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o755, (p, oct(p.stat().st_mode))


# ----------------------------------------------------------------------------------------------------------
# resume with changed settings
# ----------------------------------------------------------------------------------------------------------


def test_resume_with_a_changed_learning_rate_uses_it(tiny_original, two_clips, tmp_path, capsys):
    out = tmp_path / "o"
    train(fast_config(max_steps=3, learning_rate=1e-2), tiny_original, two_clips, out)
    capsys.readouterr()
    assert run_cli(*_args(tiny_original, two_clips, out, "--max-steps", "6", "--resume", "auto",
                          "--learning-rate", "5e-3")) == 0
    err = capsys.readouterr().err
    assert "learning rate 0.01 -> 0.005 from step 3" in err
    assert [float(r["lr"]) for r in _rows(out)] == [1e-2] * 3 + [5e-3] * 3


def test_resume_names_a_changed_precision_base_precision_or_data_split(tiny_original, two_clips, tmp_path, capsys):
    """They change the maths or the training set from the resume step: said, as the seed or batch size is."""
    out = tmp_path / "o"
    train(fast_config(max_steps=2, precision="bf16"), tiny_original, two_clips, out)
    capsys.readouterr()
    assert run_cli(*_args(tiny_original, two_clips, out, "--max-steps", "3", "--resume", "auto",
                          "--base-precision", "int8", "--val-split", "0.5", "--timestep-mu", "0.2")) == 0
    err = capsys.readouterr().err
    assert ("resuming with changed settings: timestep_mu, val_split, precision, base_precision changed: applied "
            "from step 2, so the run will not repeat an uninterrupted one") in err
    assert json.loads((out / "training_config.json").read_text())["config"]["base_precision"] == "int8"


def test_extending_a_run_continues_the_schedule_without_a_jump(tiny_original, two_clips, tmp_path, capsys):
    """Cosine over 6 steps, stopped at 3, resumed with --max-steps 12: the learning rate goes on from where it was
    and falls to its final value at step 12 (recomputing the curve for 12 steps would jump back up)."""
    cfg = fast_config(max_steps=6, scheduler="cosine", learning_rate=1e-2, min_lr_ratio=0.01)
    out = tmp_path / "o"
    train(cfg, tiny_original, two_clips, out, should_stop=stop_after(3))
    full = train(cfg, tiny_original, two_clips, tmp_path / "full")
    assert full.status == "complete"
    res = train(cfg.replace(max_steps=12, resume="auto"), tiny_original, two_clips, out)
    assert res.step == 12
    lrs = [float(r["lr"]) for r in _rows(out)]
    uninterrupted = [float(r["lr"]) for r in _rows(tmp_path / "full")]
    assert lrs[:4] == pytest.approx(uninterrupted[:4], rel=1e-5)  # step 4 is where the 6-step run would be
    assert all(b < a for a, b in zip(lrs, lrs[1:])), lrs  # falling all the way, no jump
    assert lrs[-1] < 0.05 * lrs[0]
    # a finished run that is extended keeps its final rate instead of jumping back up
    more = train(cfg.replace(max_steps=9, resume="auto"), tiny_original, two_clips, tmp_path / "full")
    assert more.step == 9
    extra = [float(r["lr"]) for r in _rows(tmp_path / "full")][6:]
    assert max(extra) <= uninterrupted[-1]


# ----------------------------------------------------------------------------------------------------------
# the plan's time estimate; loss.png
# ----------------------------------------------------------------------------------------------------------


def test_the_time_estimate_matches_the_measured_step_time(tiny_original, tmp_path):
    """Two clips of different lengths with accumulation 4: an epoch has two micro-batches, so every step has two
    (the old estimate took the longest clip times 4, about 2.7 times the truth here). The estimate times the
    forward and backward passes; on the tiny model the optimizer step and bookkeeping are a visible share of a
    step that they are not at real shapes, and a shared CI machine adds noise, so this asserts a factor of 1.5
    (which the old estimate fails) rather than the ±25 % a real model gives. Or it says it cannot tell (a busy
    machine whose timings disagree)."""
    data = make_cache(tmp_path / "c", frames=(320, 160), cond_len=(6, 9))
    plans = []
    res = train(fast_config(max_steps=8, gradient_accumulation=4, estimate_steps=3), tiny_original, data,
                tmp_path / "o", progress=lambda ev: plans.append(ev) if ev["event"] == "plan" else None)
    elapsed = [float(r["elapsed_s"]) for r in _rows(res.out_dir)]
    steps = sorted(b - a for a, b in zip(elapsed, elapsed[1:]))
    measured = statistics.median(steps)
    plan = plans[0]
    if "seconds_per_step" not in plan:
        assert plan["estimate_note"].startswith("cannot tell")
        pytest.skip(f"timings disagreed on this machine: {plan['estimate_note']}")
    if steps[-1] > 1.5 * steps[0]:  # the run's own steps disagree: the machine was busy, as the estimate would say
        pytest.skip(f"the measured steps disagreed on this machine: {', '.join(f'{t:.3g}' for t in steps)} s")
    assert 1 / 1.5 < plan["seconds_per_step"] / measured < 1.5, (plan["seconds_per_step"], measured)


@pytest.mark.parametrize("mangle", ["latin-1 row", "binary junk", "one endless line"])
def test_a_loss_csv_mangled_by_another_program_does_not_stop_the_resume(tiny_original, two_clips, tmp_path, capsys,
                                                                         mangle):
    """loss.csv is only a log; opened and saved by a spreadsheet (another encoding), or damaged, it used to end the
    resume with a bare UnicodeDecodeError line naming no file. The rows that still parse are kept."""
    from sidestep_core.training.chart import read_loss_csv

    out = tmp_path / "o"
    train(fast_config(max_steps=2, save_every=2), tiny_original, two_clips, out)
    path = out / "loss.csv"
    if mangle == "latin-1 row":
        path.write_bytes(path.read_bytes() + "note,café au lait\n".encode("latin-1"))
    elif mangle == "binary junk":
        path.write_bytes(bytes(range(256)) * 8)
    else:
        path.write_bytes(path.read_bytes() + b'"' + b"x" * 200_000)  # past the csv module's field limit
    capsys.readouterr()
    assert run_cli(*_args(tiny_original, two_clips, out, "--max-steps", "4", "--save-every", "2",
                          "--resume", "auto")) == 0
    assert "Traceback" not in capsys.readouterr().err
    steps = [int(r["step"]) for r in _rows(out) if r["step"].isdigit()]
    assert steps[-2:] == [3, 4] and (steps == [1, 2, 3, 4] or mangle == "binary junk"), steps
    assert read_loss_csv(path)[0][-2:] == [3, 4]
    assert (out / "loss.png").stat().st_size > 1000


def test_every_run_folder_gets_a_loss_png(tiny_original, two_clips, tmp_path):
    from PIL import Image

    seen = {}

    def hook(step, adapter):
        png = tmp_path / "o" / "loss.png"
        seen[step] = png.is_file() and png.stat().st_mtime_ns

    train(fast_config(max_steps=4, save_every=2), tiny_original, two_clips, tmp_path / "o", step_hook=hook)
    png = tmp_path / "o" / "loss.png"
    assert seen[1] is False and seen[2] and seen[4]  # written with each checkpoint
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (768, 384)
        assert len(set(img.convert("RGB").getdata())) > 3  # a drawn curve, not a blank image


def test_a_manifest_edited_or_written_elsewhere_cannot_blow_up_the_run(tiny_original, tmp_path, capsys):
    """Preprocessing caps ``repeat`` at MAX_REPEAT, but training trusted the manifest: repeat 10**12 made the epoch
    plan a list of 10**13 visits (the process was killed for memory) and Infinity an OverflowError. A
    format_version that is no number was a traceback."""
    from sidestep_core.data.metadata import MAX_REPEAT
    from sidestep_core.training.data import open_dataset

    data = make_cache(tmp_path / "cache", frames=(40, 56, 48), cond_len=(6, 9, 7))
    manifest = json.loads((data / "manifest.json").read_text())
    for entry, repeat in zip(manifest["samples"], (10**12, float("inf"), 3)):
        entry["repeat"] = repeat
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert [c.repeat for c in open_dataset(data).clips] == [MAX_REPEAT, 1, 3]
    assert run_cli(*_args(tiny_original, data, tmp_path / "run", "--max-steps", "1")) == 0

    for version in ([1], "one"):
        manifest["format_version"] = version
        (data / "manifest.json").write_text(json.dumps(manifest))
        capsys.readouterr()
        assert run_cli(*_args(tiny_original, data, tmp_path / "run2", "--max-steps", "1")) == 2
        err = capsys.readouterr().err
        assert err == f"error: {data / 'manifest.json'}: format_version {str(version)!r} is not a number; re-run " \
                      "preprocessing\n", err


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the file if it were ever unpickled


def test_a_legacy_pt_folder_trains_and_its_bad_files_are_named(tiny_original, tmp_path, capsys):
    """ACE-Step / Side-Step ``.pt`` folders are a documented input, but training on one ended in a traceback
    (the model check read sample 0 as safetensors). Their hostile files are each one line: a pickle with code
    in it (never run), tensors of the wrong rank or of another model's width."""
    import torch

    folder = tmp_path / "legacy"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)

    def sample(frames=40, cond=9, hidden=64, extra_dim=False):
        lat = torch.randn(frames, 64, *((2,) if extra_dim else ()), generator=g)
        return {"target_latents": lat, "attention_mask": torch.ones(frames),
                "encoder_hidden_states": torch.randn(cond, hidden, generator=g),
                "encoder_attention_mask": torch.ones(cond), "context_latents": torch.randn(frames, 128, generator=g),
                "metadata": {"caption": "x"}}

    torch.save(sample(), folder / "a.pt")
    torch.save(sample(48, 7), folder / "b.pt")
    torch.save(sample(extra_dim=True), folder / "rank3.pt")
    torch.save(sample(hidden=32), folder / "width.pt")
    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(str(marker))}, folder / "evil.pt")
    out = tmp_path / "run"
    assert run_cli(*_args(tiny_original, folder, out, "--max-steps", "4")) == 0
    said = capsys.readouterr()
    text = said.out + said.err
    assert "Traceback" not in text and not marker.exists() and len(_rows(out)) == 4
    assert f"skipped {folder / 'evil.pt'}: not a readable sample ({folder / 'evil.pt'}: holds Python objects other " \
           "than tensors (not loaded, for safety))" in text
    assert f"skipped {folder / 'rank3.pt'}: expected target_latents [T,64]" in text
    assert f"skipped {folder / 'width.pt'}: widths [64, 128, 32] differ from the rest of the dataset's " \
           "[64, 128, 64]" in text
    assert all(line.count("skipped") <= 1 for line in text.splitlines())  # one line each


def test_a_damaged_or_missing_cache_sample_is_named_and_the_run_goes_on(tiny_original, tmp_path, capsys):
    """One sample file of the cache truncated (a failing disk) and one deleted (a song removed by hand): the run
    trains on the rest and names both; a cache with nothing readable is one line and exit 2."""
    data = make_cache(tmp_path / "cache", frames=(40, 56, 48), cond_len=(6, 9, 7))
    samples = json.loads((data / "manifest.json").read_text())["samples"]
    damaged, removed = (data / samples[0]["file"]), (data / samples[1]["file"])
    damaged.write_bytes(damaged.read_bytes()[:100])
    removed.unlink()
    out = tmp_path / "run"
    assert run_cli(*_args(tiny_original, data, out, "--max-steps", "2")) == 0
    err = capsys.readouterr()
    said = err.out + err.err
    # each once: the progress renderer prints the run's messages, the log handler only what it did not show
    assert said.count(f"skipped {damaged}: not a readable safetensors sample") == 1
    assert said.count(f"skipped {removed}: listed in the dataset but missing") == 1
    assert len(_rows(out)) == 2 and (out / "final").is_dir()

    (data / samples[2]["file"]).write_bytes(b"not a tensor file")
    assert run_cli(*_args(tiny_original, data, tmp_path / "run2", "--max-steps", "2")) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "no readable preprocessed sample" in ln]
    assert len(lines) == 1 and str(damaged) in lines[0] and str(removed) in lines[0]
