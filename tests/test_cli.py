"""The command line: every subcommand is registered with complete help; estimate / export / presets run end to
end with meaningful exit codes."""

from __future__ import annotations

import json

import pytest

from adapter_helpers import DIT, saved_adapter
from sidestep_core.cli import COMMANDS, build_parser, main
from train_helpers import make_cache


@pytest.fixture(scope="module")
def dit(tiny_original):
    return tiny_original / DIT


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_subcommand_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)  # every module exists (cli.py skips missing ones silently)
    assert {"demo", "make-tiny-checkpoint", "preprocess", "train", "estimate", "export", "presets"} <= set(COMMANDS)


@pytest.mark.parametrize("command, words", [
    ("estimate", ["--checkpoint", "--dataset", "--batches", "--focus", "--top-k", "--targets-from", "exit codes"]),
    ("export", ["--out", "--checkpoint", "--key-style", "LoraLoaderModelOnly", "exit codes"]),
    ("presets", ["list", "show", "save", "delete", "recommended"]),
    ("demo", ["--workdir", "--adapter", "exit codes"]),
])
def test_help(capsys, command, words):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    for w in words:
        assert "".join(w.split()) in text, w


def test_top_level_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert main([]) == 2


def test_export(tmp_path, dit, capsys):
    folder, _ = saved_adapter(tmp_path, dit, "lokr_lowrank")
    out = tmp_path / "x.safetensors"
    code, stdout, _ = _run(["export", folder, "--checkpoint", dit, "--out", out, "--plain"], capsys)
    assert code == 0 and out.is_file()
    assert "verified" in stdout and f"wrote {out}" in stdout
    code, _, err = _run(["export", folder, "--out", out, "--no-overwrite"], capsys)
    assert code == 2 and "exists" in err
    code, _, err = _run(["export", tmp_path / "missing"], capsys)
    assert code == 2 and "no such file" in err
    # default output path: beside the adapter
    code, stdout, _ = _run(["export", folder, "--key-style", "lycoris"], capsys)
    assert code == 0 and (tmp_path / "lokr_lowrank_comfyui.safetensors").is_file()
    assert "not verified" in stdout


def test_export_dora_needs_or_finds_the_base_model(tmp_path, dit, capsys):
    folder, _ = saved_adapter(tmp_path, dit, "dora")
    code, _, err = _run(["export", folder], capsys)
    assert code == 2 and "needs the base model" in err and "--checkpoint" in err
    # inside a training run, training_config.json names the model
    run = tmp_path / "run"
    folder.rename(tmp_path / "final")
    run.mkdir()
    (tmp_path / "final").rename(run / "final")
    (run / "training_config.json").write_text(json.dumps({"config": {"checkpoint": str(dit)}}))
    code, stdout, _ = _run(["export", run, "--out", tmp_path / "d.safetensors"], capsys)
    assert code == 0, stdout
    assert "base model" in stdout and "verified" in stdout


def test_estimate(tmp_path, dit, capsys):
    ds = make_cache(tmp_path / "ds", frames=(24, 32), cond_len=(5, 6))
    out = tmp_path / "e.json"
    code, stdout, err = _run(["--plain", "estimate", "--checkpoint", dit, "--dataset", ds, "--batches", 1,
                              "--runs", 1, "--device", "cpu", "--precision", "fp32", "--crop-seconds", 0,
                              "--no-gradient-checkpointing", "--out", out, "--top-k", 5, "--groups", "self_attn",
                              "mlp"], capsys)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert len(data["train_settings"]["target_modules"]) == 5
    assert {r["group"] for r in data["modules"]} == {"self_attn", "mlp"}
    assert "--targets-from" in stdout and "estimate 1/" in err  # plain progress lines
    code, _, err = _run(["estimate", "--checkpoint", dit, "--dataset", ds, "--focus", "sharp"], capsys)
    assert code == 2 and "focus" in err


def test_presets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIDESTEP_CONFIG_DIR", str(tmp_path / "cfg"))
    code, stdout, _ = _run(["presets", "list"], capsys)
    assert code == 0 and "quick_test" in stdout and "builtin" in stdout
    code, stdout, _ = _run(["presets", "show", "vram_8gb"], capsys)
    assert code == 0 and "rank = 16" in stdout
    code, stdout, _ = _run(["presets", "save", "mine", "--from", "vram_12gb", "--rank", 20, "--no-target-mlp",
                            "--description", "test"], capsys)
    assert code == 0 and "saved preset mine" in stdout
    stored = json.loads((tmp_path / "sidestep_presets" / "mine.json").read_text())["settings"]
    assert stored["rank"] == 20 and stored["target_mlp"] is False and stored["crop_seconds"] == 45.0
    code, stdout, _ = _run(["presets", "show", "mine", "--json"], capsys)
    assert json.loads(stdout)["description"] == "test"
    code, _, err = _run(["presets", "save", "mine", "--rank", 8], capsys)
    assert code == 2 and "exists" in err
    with pytest.raises(SystemExit) as e:  # paths are not preset settings: no such option
        main(["presets", "save", "other", "--checkpoint", "/x"])
    assert e.value.code == 2
    capsys.readouterr()
    code, stdout, _ = _run(["presets", "delete", "mine"], capsys)
    assert code == 0 and "deleted" in stdout
    code, _, err = _run(["presets", "show", "mine"], capsys)
    assert code == 2 and "not found" in err
