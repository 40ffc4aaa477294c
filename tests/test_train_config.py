"""TrainConfig: validation names the field, dict round trip, argparse generated from the fields."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from sidestep_core.config import RUN_ONLY_FIELDS, TrainConfig


def test_defaults_validate_and_round_trip():
    cfg = TrainConfig(checkpoint="/m", dataset="/d", out="/o", rank_pattern={"q_proj": 8})
    assert cfg.validate() is cfg
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg
    preset = cfg.to_dict(include_run=False)
    assert not RUN_ONLY_FIELDS & set(preset)
    assert RUN_ONLY_FIELDS <= {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("change, field", [
    (dict(adapter="lycoris"), "adapter"),
    (dict(rank=0), "rank"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(cfg_ratio=1.5), "cfg_ratio"),
    (dict(dropout=1.0), "dropout"),
    (dict(timestep_mode="sigmoid"), "timestep_mode"),
    (dict(max_steps=0, epochs=0), "max_steps"),
    (dict(checkpointing_ratio=-0.1), "checkpointing_ratio"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    (dict(rank_pattern={"q_proj": 2.5}), "rank_pattern"),
    (dict(attention="none"), "attention"),
    (dict(precision="fp8"), "precision"),
    (dict(gradient_accumulation=0), "gradient_accumulation"),
    (dict(lokr_factor=0), "lokr_factor"),
    (dict(adapter="oft", rank_pattern={"q_proj": 4}), "rank_pattern"),
])
def test_validate_names_the_field(change, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        TrainConfig(**change).validate()


def test_from_dict_rejects_unknown_and_coerces_strings():
    with pytest.raises(ValueError, match="unknown setting"):
        TrainConfig.from_dict({"rnak": 4})
    cfg = TrainConfig.from_dict({"rank": "8", "learning_rate": "3e-4", "target_mlp": "true",
                                 "target_modules": "q_proj, v_proj", "rank_pattern": '{"q_proj": 4}'})
    assert (cfg.rank, cfg.learning_rate, cfg.target_mlp) == (8, 3e-4, True)
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.rank_pattern == {"q_proj": 4}
    with pytest.raises(ValueError, match="^rank:"):
        TrainConfig.from_dict({"rank": "eight"})


def test_argparse_has_every_field_and_only_given_values_override():
    parser = argparse.ArgumentParser()
    TrainConfig.add_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= flags
    for action in parser._actions:
        if action.dest in flags and action.dest != "help":
            assert action.help, action.dest
    ns = parser.parse_args(["--adapter", "lokr", "--rank", "16", "--no-gradient-checkpointing",
                            "--target-modules", "q_proj", "self_attn.v_proj", "--rank-pattern", '{"q_proj": 8}'])
    base = TrainConfig(learning_rate=5e-4)
    cfg = TrainConfig.from_args(ns, base)
    assert (cfg.adapter, cfg.rank, cfg.gradient_checkpointing) == ("lokr", 16, False)
    assert cfg.target_modules == ["q_proj", "self_attn.v_proj"] and cfg.rank_pattern == {"q_proj": 8}
    assert cfg.learning_rate == 5e-4  # not given on the command line: the base value stays
    with pytest.raises(SystemExit):
        parser.parse_args(["--adapter", "nope"])
