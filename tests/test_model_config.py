import json

import pytest
import torch

from sidestep_core.model import AceStepConfig, AceStepModel
from sidestep_core.model.config import FULL, SLIDING
from sidestep_core.tiny import get_profile


def _shapes(config):
    with torch.device("meta"):
        model = AceStepModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


REAL_2B_CONFIG = {
    "architectures": ["AceStepConditionGenerationModel"],
    "model_type": "acestep",
    "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "in_channels": 192, "sliding_window": 128,
    "timestep_mu": -0.4, "timestep_sigma": 1.0, "is_turbo": True, "model_version": "turbo",
    "auto_map": {"AutoModel": "modeling_acestep_v15_turbo.AceStepConditionGenerationModel"},
    "dtype": "bfloat16", "layer_types": None, "rope_scaling": None,
}


def test_real_config_fields_and_extras_round_trip(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(REAL_2B_CONFIG))
    cfg = AceStepConfig.from_json(p)
    assert cfg.in_channels == 192 and cfg.sliding_window == 128
    assert cfg.layer_types[:3] == [SLIDING, FULL, SLIDING] and len(cfg.layer_types) == 24
    assert cfg.extra["auto_map"]["AutoModel"].endswith("AceStepConditionGenerationModel")
    back = cfg.to_dict()
    assert back["auto_map"] == REAL_2B_CONFIG["auto_map"] and back["hidden_size"] == 2048


def test_2b_parameter_count_matches_the_released_checkpoint():
    shapes = _shapes(AceStepConfig.from_dict(REAL_2B_CONFIG))
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert len(shapes) == 677  # tensors in the released model.safetensors
    assert total == 2_393_872_518
    decoder = sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith("decoder."))
    assert decoder == 1_575_458_880
    assert shapes["decoder.proj_in.1.weight"] == (2048, 192, 2)
    assert shapes["decoder.proj_out.1.weight"] == (2048, 64, 2)


def test_old_inner_mlp_width_name_is_accepted():
    cfg = AceStepConfig.from_dict({"hidden_size": 64, "inner_mlp_width": 96})
    assert cfg.intermediate_size == 96


@pytest.mark.parametrize("profile", ["tiny", "comfyui-min"])
def test_inference_from_shapes_recovers_the_architecture(profile):
    cfg = get_profile(profile).dit
    inferred = AceStepConfig.infer_from_state_dict(_shapes(cfg))
    assert _shapes(inferred) == _shapes(cfg)
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "encoder_hidden_size", "tokenizer_intermediate_size"):
        assert getattr(inferred, name) == getattr(cfg, name), name


def test_inference_of_xl_widths():
    xl = AceStepConfig(hidden_size=2560 // 20, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=16, encoder_hidden_size=64, encoder_intermediate_size=80,
                       encoder_num_attention_heads=4, encoder_num_key_value_heads=2, text_hidden_dim=32,
                       num_lyric_encoder_hidden_layers=1, num_timbre_encoder_hidden_layers=1,
                       num_attention_pooler_hidden_layers=1, fsq_dim=64)
    inferred = AceStepConfig.infer_from_state_dict(_shapes(xl))
    assert inferred.encoder_hidden_size == 64 and inferred.encoder_intermediate_size == 80
    assert inferred.hidden_size == 128 and _shapes(inferred) == _shapes(xl)


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="layer_types"):
        AceStepConfig(num_hidden_layers=4, layer_types=[SLIDING])
    with pytest.raises(ValueError, match="unknown layer types"):
        AceStepConfig(num_hidden_layers=1, layer_types=["causal"])


@pytest.mark.parametrize("scaling,factor", [
    (None, 1.0),
    ({"rope_type": "default"}, 1.0),
    ({"rope_type": "linear", "factor": 4.0}, 4.0),
    ({"type": "linear", "factor": 2}, 2.0),  # the older key name, which upstream's config class still accepts
])
def test_rope_scaling_that_is_honoured(scaling, factor):
    cfg = AceStepConfig.from_dict({**REAL_2B_CONFIG, "rope_scaling": scaling})
    assert cfg.rope_factor() == factor
    with torch.device("meta"):
        model = AceStepModel(cfg)
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    for rotary in (model.decoder.rotary, model.encoder.lyric_encoder.rotary, model.encoder.timbre_encoder.rotary):
        assert torch.allclose(rotary.inv_freq, base / factor)


@pytest.mark.parametrize("scaling,words", [
    ({"rope_type": "yarn", "factor": 4.0}, "'yarn' is not supported"),
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported"),
    ({"rope_type": "linear"}, "positive 'factor'"),
    ({"rope_type": "linear", "factor": 0}, "positive 'factor'"),
    ("linear", "must be an object"),
])
def test_rope_scaling_that_is_refused_names_file_and_key(tmp_path, scaling, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**REAL_2B_CONFIG, "rope_scaling": scaling}))
    with pytest.raises(ValueError) as err:
        AceStepConfig.from_json(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "rope_scaling" in msg and words in msg


def test_cli_refuses_a_checkpoint_with_unsupported_rope_scaling(tmp_path, capsys):
    from sidestep_core.cli import main
    from sidestep_core.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "m", "original", "tiny", 0)
    config = ckpt.dit / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rope_scaling": {"rope_type": "yarn",
                                                                                      "factor": 4.0}}))
    rc = main(["generate", "--checkpoint", str(ckpt.dit), "--caption", "x", "--seconds", "1",
               "--out", str(tmp_path / "x.flac"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(config) in err and "rope_scaling" in err and "'yarn' is not supported" in err
    assert not (tmp_path / "x.flac").exists()
