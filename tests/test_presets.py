"""Presets: built-ins, user and project presets, lookup order, validation and composing a run's configuration."""

from __future__ import annotations

import json

import pytest

from sidestep_core import presets as P
from sidestep_core.config import RUN_ONLY_FIELDS, TrainConfig


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    project, user = tmp_path / "proj", tmp_path / "cfg"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv("SIDESTEP_CONFIG_DIR", str(user))
    return tmp_path / "proj" / P.PROJECT_DIRNAME, user / "presets"


EXPECTED = ("recommended", "quick_test", "high_quality", "vram_24gb_plus", "vram_16gb", "vram_12gb", "vram_8gb",
            "dit_and_lm", "lm_only")


def test_builtins_are_valid_and_hold_no_run_settings():
    assert tuple(P.BUILTIN) == EXPECTED
    for name in EXPECTED:
        pr = P.get_preset(name)
        assert pr.scope == "builtin" and pr.description
        assert not set(pr.settings) & RUN_ONLY_FIELDS
        cfg = pr.config()
        assert isinstance(cfg, TrainConfig)
        assert P.validate_settings(pr.settings) == pr.settings
    quick = P.load_preset("quick_test")
    assert 0 < quick.max_steps <= 100 and quick.save_every == 0
    ranks = [P.load_preset(n).rank for n in ("vram_24gb_plus", "vram_16gb", "vram_12gb", "vram_8gb")]
    assert ranks == sorted(ranks, reverse=True)
    assert P.load_preset("vram_24gb_plus").gradient_checkpointing is False
    assert P.load_preset("vram_8gb").target_mlp is False


def test_save_list_show_delete_and_priority(dirs):
    project, user = dirs
    path = P.save_preset("my run", {"rank": 8, "alpha": 16.0}, description="mine", scope="user")
    assert path == user / "my_run.json"
    data = json.loads(path.read_text())
    assert data["format"] == P.FORMAT and data["settings"] == {"rank": 8, "alpha": 16.0}
    assert "my_run" in P.list_presets() and P.list_presets()[: len(EXPECTED)] == list(EXPECTED)
    assert P.get_preset("my_run").scope == "user"
    # the project folder wins over the user folder
    P.save_preset("my_run", {"rank": 12}, scope="project")
    assert (project / "my_run.json").is_file()
    pr = P.get_preset("my_run")
    assert pr.scope == "project" and P.load_preset("my_run").rank == 12
    assert [p.scope for p in P.all_presets() if p.name == "my_run"] == ["project"]
    with pytest.raises(P.PresetError, match="exists"):
        P.save_preset("my_run", {"rank": 4}, scope="project")
    P.save_preset("my_run", {"rank": 4}, scope="project", overwrite=True)
    assert P.load_preset("my_run").rank == 4
    assert P.delete_preset("my_run") == project / "my_run.json"
    assert P.get_preset("my_run").scope == "user"
    P.delete_preset("my_run", scope="user")
    with pytest.raises(P.PresetError, match="not found"):
        P.get_preset("my_run")


def test_presets_never_hold_paths_or_devices(dirs):
    with pytest.raises(P.PresetError, match="paths or device settings"):
        P.validate_settings({"rank": 8, "checkpoint": "/models/x"})
    # saving a whole config drops the run fields
    cfg = TrainConfig(checkpoint="/m", dataset="/d", out="/o", device="cuda:1", rank=24)
    path = P.save_preset("from_cfg", cfg)
    stored = json.loads(path.read_text())["settings"]
    assert not set(stored) & RUN_ONLY_FIELDS and stored["rank"] == 24
    # and a hand-written file that holds them is refused when read
    path.write_text(json.dumps({"settings": {"rank": 8, "out": "/tmp/x"}}))
    with pytest.raises(P.PresetError, match="paths or device"):
        P.get_preset("from_cfg")
    assert "from_cfg" not in P.list_presets()  # unreadable files are skipped in listings


def test_bad_names_and_values(dirs):
    for bad in ("../evil", "a/b", "", "con", "x" * 80, "-lead"):
        with pytest.raises(P.PresetError):
            P.clean_name(bad)
    assert P.clean_name("my preset") == "my_preset"
    with pytest.raises(P.PresetError, match="built in"):
        P.save_preset("recommended", {"rank": 8})
    with pytest.raises(P.PresetError, match="built in and cannot be deleted"):
        P.delete_preset("recommended")
    with pytest.raises(P.PresetError, match="rank: must be an integer >= 1"):
        P.save_preset("neg", {"rank": 0})
    with pytest.raises(P.PresetError, match="unknown setting"):
        P.save_preset("typo", {"rnak": 8})
    with pytest.raises(P.PresetError, match="learning_rate"):
        P.save_preset("lr", {"learning_rate": "fast"})
    project, _ = dirs
    project.mkdir(parents=True)
    (project / "huge.json").write_bytes(b" " * (P.MAX_FILE_BYTES + 1))
    with pytest.raises(P.PresetError, match="larger than 1 MiB"):
        P.get_preset("huge")
    (project / "broken.json").write_text("{")
    with pytest.raises(P.PresetError, match="not a readable preset"):
        P.get_preset("broken")


def test_numbers_stored_as_strings_are_accepted(dirs):
    project, _ = dirs
    project.mkdir(parents=True)
    (project / "hand.json").write_text(json.dumps({"name": "hand", "settings": {"rank": "16", "alpha": "32",
                                                                                 "target_mlp": "true"}}))
    cfg = P.load_preset("hand")
    assert (cfg.rank, cfg.alpha, cfg.target_mlp) == (16, 32.0, True)


def test_compose_config_precedence(dirs, tmp_path):
    conf = tmp_path / "run.json"
    conf.write_text(json.dumps({"rank": 48, "learning_rate": 3e-4, "checkpoint": "/m"}))
    cfg = P.compose_config("vram_12gb", conf, {"learning_rate": 5e-5})
    assert cfg.rank == 48  # config file over preset
    assert cfg.learning_rate == 5e-5  # command line over config file
    assert cfg.crop_seconds == 45.0  # preset over defaults
    assert cfg.checkpoint == "/m"  # run settings come from the config file / command line, not presets
    # a run's training_config.json and a preset file work as --config too
    (tmp_path / "training_config.json").write_text(json.dumps({"version": "x", "config": {"rank": 20},
                                                               "model": {}}))
    assert P.compose_config(config_file=tmp_path / "training_config.json").rank == 20
    with pytest.raises(ValueError, match="unknown setting"):
        (tmp_path / "typo.json").write_text(json.dumps({"rnak": 1}))
        P.compose_config(config_file=tmp_path / "typo.json")
