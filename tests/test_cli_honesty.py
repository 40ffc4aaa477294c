"""The command line starts fast, says what it needs, and fails early and in one line: no heavy imports to build the
parser, no bitsandbytes notice, honest help texts, a closed pipe is no traceback, and generate refuses a folder that
is no model or a file that is no adapter before loading anything, and warns about an adapter of another model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidestep_core.cli import COMMANDS, main
from train_helpers import fast_config, make_cache, single_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "safetensors", "transformers", "peft", "diffusers", "lycoris", "bitsandbytes",
         "accelerate", "av", "tensorboard", "tqdm", "PIL", "pyloudnorm", "prodigyopt")


def _python(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


def _heavy_after(code: str) -> list[str]:
    r = _python(code + f"\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    return eval(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", list(COMMANDS))
def test_building_a_subcommand_parser_imports_no_heavy_library(command):
    """`sidestep --help` has to start in well under 2 s: torch and friends load only when a command runs."""
    assert _heavy_after(
        "import argparse, importlib\nfrom sidestep_core.cli import COMMANDS\n"
        f"mod = importlib.import_module('sidestep_core.commands.' + COMMANDS[{command!r}])\n"
        f"mod.register(argparse.ArgumentParser().add_subparsers(), {command!r})") == []


def test_importing_the_cli_imports_no_heavy_library():
    assert _heavy_after("import sidestep_core.cli") == []


def test_the_whole_parser_imports_no_heavy_library():
    assert _heavy_after("from sidestep_core.cli import build_parser\nbuild_parser()") == []


def test_the_bitsandbytes_kernel_notice_is_not_shown_but_other_warnings_are():
    pytest.importorskip("bitsandbytes")
    r = _python("import sidestep_core, peft, logging\n"
                "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another bitsandbytes problem')")
    assert r.returncode == 0, r.stderr
    assert "gemm_4bit_forward" not in r.stderr
    assert "another bitsandbytes problem" in r.stderr


# ----------------------------------------------------------------------------------------------------------
# help
# ----------------------------------------------------------------------------------------------------------


def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_compare_has_its_own_help(capsys):
    gen, cmp = _help(capsys, "generate"), _help(capsys, "compare")
    assert gen != cmp
    assert "--compare" in gen and "--compare" not in cmp
    assert "output folder for the clips and the table" in cmp and "output .flac file" not in cmp
    assert "training run folder" in cmp


@pytest.mark.parametrize("command", ["train", "generate", "compare"])
def test_help_has_the_exit_codes(capsys, command):
    assert "exit codes: 0 done" in _help(capsys, command)


def test_train_help_shows_required_options_and_each_default_once(capsys):
    text = _help(capsys, "train")
    options = text.split("run options:", 1)[1]
    for name in ("--checkpoint CHECKPOINT", "--dataset DATASET", "--out OUT"):
        entry = options.split(name, 1)[1].split(" --resume", 1)[0][:200]
        assert "(required, here or in --config)" in entry and "default" not in entry, entry
    assert 'default: ""' not in text and "default: null" not in text
    for option in text.split(" --")[1:]:
        assert option.count("(default:") <= 1, option


def test_a_closed_pipe_is_no_traceback():
    """`sidestep presets show recommended | head -1`: the reader is gone; the command ends quietly."""
    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE, as after `head` has exited
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        r = subprocess.run([sys.executable, "-m", "sidestep_core", "presets", "show", "recommended"], cwd=ROOT,
                           env=env, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_train_without_a_required_option_says_so(capsys, tmp_path):
    assert main(["train", "--dataset", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# early, clear errors in generate / compare
# ----------------------------------------------------------------------------------------------------------


def test_a_folder_that_is_no_model_is_named_as_such(tmp_path, capsys):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    assert main(["generate", "--checkpoint", str(folder), "--caption", "x", "--out", str(tmp_path / "a.flac"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "not an ACE-Step model" in err and "VAE" not in err, err


def test_a_file_that_is_no_adapter_is_refused_before_the_model_loads(tmp_path, capsys):
    junk = tmp_path / "my_lora.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    # the model does not even exist: the adapter is checked first
    for cmd in (["generate", "--out", str(tmp_path / "a.flac")], ["compare", "--out", str(tmp_path / "c")]):
        assert main([*cmd, "--checkpoint", str(tmp_path / "missing_model"), "--caption", "x", "--adapter",
                     str(junk), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {junk}"), err


def test_an_adapter_of_another_model_of_the_same_shape_is_warned_about(tiny_original, tmp_path, capsys):
    from sidestep_core.tiny import make_tiny_checkpoint
    from sidestep_core.training import train

    other = make_tiny_checkpoint(tmp_path / "other", "original", "tiny", 1).root / "acestep-v15-turbo"
    data = make_cache(tmp_path / "c", frames=(40, 56), cond_len=(6, 9))
    train(fast_config(max_steps=1), tiny_original, data, tmp_path / "run")
    adapter = tmp_path / "run" / "final"
    capsys.readouterr()
    base = ["generate", "--caption", "x", "--seconds", "0.2", "--device", "cpu", "--adapter", str(adapter)]
    assert main([*base, "--checkpoint", str(other), "--out", str(tmp_path / "a.flac")]) == 0
    assert f"warning: {adapter} was trained on another model" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(tiny_original), "--out", str(tmp_path / "b.flac")]) == 0
    assert "warning" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------------------------------


class _Terminal:
    """A stderr that says it is a terminal and keeps what was drawn (tqdm redraws with carriage returns)."""

    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def _step(step, loss):
    return {"event": "step", "step": step, "total": 10, "epoch": 0, "loss": loss, "smoothed_loss": loss, "lr": 1e-3,
            "grad_norm": 1.0, "steps_per_s": 1.0, "eta_s": 10.0 - step}


def test_progress_is_plain_lines_when_the_output_is_not_a_terminal(monkeypatch, capsys):
    from sidestep_core.commands.train import _Renderer

    r = _Renderer(False, unit="step")
    r(_step(1, 0.5))
    r.close()
    assert capsys.readouterr().err.strip() == "1/10 loss 0.5000 (avg 0.5000) lr 1.00e-03 eta 0:09"


def test_the_bar_shows_the_current_steps_loss_and_one_eta(monkeypatch):
    from sidestep_core.commands.train import _Renderer

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    r = _Renderer(False, unit="step")
    assert not r.plain
    r(_step(1, 1.0))
    r.bar.mininterval, r.bar.miniters, r.bar.dynamic_miniters = 0, 0, False  # redraw on every update
    r(_step(2, 2.0))
    last = term.text.split("\r")[-1]
    assert "2/10" in last and "loss 2.0000" in last, last
    assert "eta" not in last  # tqdm's own remaining time is the one ETA
    r.close()


def test_a_finished_stage_bar_stops_its_clock(monkeypatch):
    """Preprocessing-style stage events: the bar of a finished stage is closed at once, so the time until the next
    stage starts (e.g. loading the model after hashing) is not counted in it."""
    from sidestep_core.commands._progress import Renderer

    monkeypatch.setattr(sys, "stderr", _Terminal())
    r = Renderer(False)
    r({"stage": "hash", "done": 1, "total": 2})
    assert r.bar is not None
    r({"stage": "hash", "done": 2, "total": 2})
    assert r.bar is None


def test_training_ends_with_one_final_line(tiny_original, tmp_path, capsys):
    data = make_cache(tmp_path / "c", frames=(40, 56), cond_len=(6, 9))
    assert main(["train", "--checkpoint", str(tiny_original), "--dataset", str(data), "--out", str(tmp_path / "o"),
                 "--rank", "4", "--max-steps", "2", "--precision", "fp32", "--device", "cpu", "--crop-seconds",
                 "0", "--no-tensorboard", "--estimate-steps", "0"]) == 0
    err = capsys.readouterr().err
    assert err.count(str(tmp_path / "o" / "final")) == 1 and err.rstrip().endswith(
        f"done: 2 steps; adapter: {tmp_path / 'o' / 'final'}"), err


def test_the_preprocess_parser_constants_are_the_cores():
    """commands/preprocess.py spells these out so its parser imports no torch; they must stay the core's."""
    from sidestep_core.audio.loudness import MODES
    from sidestep_core.commands import preprocess as cmd
    from sidestep_core.data.preprocess import MODEL_MAX_SECONDS
    from sidestep_core.text.prompts import PROMPT_STYLES

    assert (cmd.PROMPT_STYLES, cmd.LOUDNESS_MODES, cmd.MODEL_MAX_SECONDS) == (PROMPT_STYLES, MODES, MODEL_MAX_SECONDS)


def test_the_plan_parser_shapes_are_the_cores():
    from sidestep_core.commands import plan as cmd
    from sidestep_core.device.shapes import SHAPES

    assert cmd.SHAPES == SHAPES
