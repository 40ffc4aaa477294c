"""Choosing an adapter from a training run (final, step_N, last, ema, step_N/ema) and the errors that list what
exists; ``sidestep export --pick`` on a run trained with EMA."""

from __future__ import annotations

import pytest

from sidestep_core.adapters.choice import CheckpointChoiceError, resolve_checkpoint, run_checkpoints
from sidestep_core.cli import main as cli_main


def _run(tmp_path, ema=True):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for n in (5, 10, 20):
        d = run / "checkpoints" / f"step_{n}"
        (d / "ema" if ema else d).mkdir(parents=True)
        (d / "training_state.json").write_text("{}")
    (run / "checkpoints" / "step_30").mkdir()  # incomplete: no training state
    (run / "final" / ("ema" if ema else "")).mkdir(parents=True, exist_ok=True)
    return run


def test_choices_resolve_to_folders(tmp_path):
    run = _run(tmp_path)
    assert [label for label, _ in run_checkpoints(run)] == [
        "step_5", "step_5/ema", "step_10", "step_10/ema", "step_20", "step_20/ema", "final", "ema"]
    assert resolve_checkpoint(run) == run / "final"
    assert resolve_checkpoint(run, "ema") == run / "final" / "ema"
    assert resolve_checkpoint(run, "step_10") == run / "checkpoints" / "step_10"
    assert resolve_checkpoint(run, "step_10/ema") == run / "checkpoints" / "step_10" / "ema"
    assert resolve_checkpoint(run, "last") == run / "checkpoints" / "step_20"
    assert resolve_checkpoint(run, "last/ema") == run / "checkpoints" / "step_20" / "ema"
    # a plain adapter folder answers final with itself, ema with its ema/ subfolder
    assert resolve_checkpoint(run / "final") == run / "final"
    assert resolve_checkpoint(run / "final", "ema") == run / "final" / "ema"


def test_errors_list_what_exists(tmp_path):
    run = _run(tmp_path, ema=False)
    with pytest.raises(CheckpointChoiceError, match=r"no checkpoint 'step_30'.*has: step_5, step_10, step_20, final"):
        resolve_checkpoint(run, "step_30")
    with pytest.raises(CheckpointChoiceError, match=r"no checkpoint 'ema' \(EMA weights .*--ema-decay\)"):
        resolve_checkpoint(run, "ema")
    with pytest.raises(CheckpointChoiceError, match="unknown checkpoint choice 'best'"):
        resolve_checkpoint(run, "best")
    with pytest.raises(CheckpointChoiceError, match="not a training run folder"):
        resolve_checkpoint(run / "final", "step_5")
    with pytest.raises(CheckpointChoiceError, match="no such file or folder"):
        resolve_checkpoint(tmp_path / "missing")


def test_export_picks_the_ema_adapter_of_a_run(tiny_original, tmp_path, capsys):
    from sidestep_core.adapters import read_adapter_weights
    from sidestep_core.training import train
    from train_helpers import fast_config, make_cache

    data = make_cache(tmp_path / "cache", frames=(40, 48), cond_len=(6, 7), seed=5)
    out = tmp_path / "out"
    train(fast_config(max_steps=3, save_every=2, ema_decay=0.5), tiny_original, data, out)
    rc = cli_main(["export", str(out), "--pick", "step_2/ema", "--checkpoint", str(tiny_original), "--plain"])
    assert rc == 0
    written = out / "checkpoints" / "step_2_ema_comfyui.safetensors"
    assert written.is_file()
    assert read_adapter_weights(written).all_modules().keys() == \
        read_adapter_weights(out / "checkpoints" / "step_2" / "ema").all_modules().keys()
    assert cli_main(["export", str(out), "--pick", "step_1", "--plain"]) != 0
    assert "has: step_2, step_2/ema, step_3, step_3/ema, final, ema" in capsys.readouterr().err
