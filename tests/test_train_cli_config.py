"""Where `sidestep train` takes its settings from: preset < config file < estimate targets < options."""

import json

import pytest

from sidestep_core.cli import build_parser
from sidestep_core.commands.train import build_config


def parse(*argv):
    return build_parser().parse_args(["train", "--checkpoint", "c", "--dataset", "d", "--out", "o", *argv])


def test_preset_then_config_file_then_options(tmp_path):
    cfg_file = tmp_path / "settings.json"
    cfg_file.write_text(json.dumps({"rank": 32, "learning_rate": 5e-4}))
    cfg = build_config(parse("--preset", "quick_test", "--config", str(cfg_file), "--learning-rate", "1e-3"))
    assert cfg.max_steps == 50 and cfg.crop_seconds == 20.0  # from the preset
    assert cfg.rank == 32  # the config file overrides the preset
    assert cfg.learning_rate == 1e-3  # the command line overrides both
    assert (cfg.checkpoint, cfg.dataset, cfg.out) == ("c", "d", "o")


def test_targets_from_an_estimate_file(tmp_path):
    est = tmp_path / "estimate.json"
    est.write_text(json.dumps({"train_settings": {
        "target_modules": ["layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"],
        "rank_pattern": {"layers.0.self_attn.q_proj": 16}, "alpha_pattern": {"layers.0.self_attn.q_proj": 32}}}))
    cfg = build_config(parse("--targets-from", str(est)))
    assert cfg.target_modules == ["layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"]
    assert cfg.rank_pattern == {"layers.0.self_attn.q_proj": 16}
    oft = build_config(parse("--targets-from", str(est), "--adapter", "oft"))
    assert oft.target_modules and not oft.rank_pattern  # ranks do not apply to OFT


def test_unknown_preset_and_bad_values_are_clear(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        build_config(parse("--preset", "nope"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cfg_ratio": 3}))
    with pytest.raises(ValueError, match="cfg_ratio"):
        build_config(parse("--config", str(bad)))
