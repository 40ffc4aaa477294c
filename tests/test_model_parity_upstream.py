"""Our model against golden outputs of the upstream ACE-Step 1.5 code (tests/data/README.md says how they were made)."""

import json

import pytest
import torch

from sidestep_core.tiny import get_profile

from goldens import assert_close as close
from goldens import (check_condition_encoder, check_decoder_velocity, check_tokenizer_and_detokenizer, read_golden,
                     tiny_model)


@pytest.fixture(scope="module")
def golden():
    return read_golden("upstream_golden_tiny.safetensors")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_golden_was_made_from_our_generator_config(golden):
    _, meta = golden
    cfg = json.loads(meta["config_json"])
    ours = get_profile("tiny").dit.to_dict()
    for key in ("hidden_size", "num_hidden_layers", "sliding_window", "num_key_value_heads", "text_hidden_dim"):
        assert cfg[key] == ours[key], key


@pytest.mark.parametrize("case", ["dec_T37", "dec_T40", "dec_T37_r"])
def test_decoder_velocity(golden, model, case):
    check_decoder_velocity(model, golden[0], case)


@pytest.mark.parametrize("case", ["enc", "enc1"])
def test_condition_encoder(golden, model, case):
    check_condition_encoder(model, golden[0], case)


def test_audio_tokenizer_and_detokenizer(golden, model):
    check_tokenizer_and_detokenizer(model, golden[0])


def test_padded_lyric_batch_where_a_window_holds_no_real_key(model):
    """Sample 1 has 4 real lyric tokens of 30: its padded queries past 4 + window see only padding in the sliding
    layers, where upstream's additive mask averages every key (our bool mask used to give zeros)."""
    g, meta = read_golden("upstream_golden_lyric_pad_tiny.safetensors")
    assert json.loads(meta["config_json"])["sliding_window"] == 8
    assert g["enc_lpad.in.lyric_attention_mask"].sum(dim=1).tolist() == [30, 4]
    names = ["text_hidden_states", "text_attention_mask", "lyric_hidden_states", "lyric_attention_mask",
             "refer_audio_acoustic_hidden_states_packed", "refer_audio_order_mask"]
    with torch.no_grad():
        states, mask = model.encoder(*(g[f"enc_lpad.in.{n}"] for n in names))
    assert torch.equal(mask, g["enc_lpad.out.encoder_attention_mask"])
    close(states, g["enc_lpad.out.encoder_hidden_states"])


@pytest.fixture(scope="module")
def rope_golden():
    return read_golden("upstream_golden_rope_linear_tiny.safetensors")


def rope_cases(model, g):
    names = ["text_hidden_states", "text_attention_mask", "lyric_hidden_states", "lyric_attention_mask",
             "refer_audio_acoustic_hidden_states_packed", "refer_audio_order_mask"]
    with torch.no_grad():
        v = model.decoder(*(g[f"dec_T40.in.{n}"] for n in
                            ("hidden_states", "timestep", "timestep_r", "encoder_hidden_states", "context_latents")))
        states, _ = model.encoder(*(g[f"enc.in.{n}"] for n in names))
    return v, states


def test_linear_rope_scaling_matches_upstream(rope_golden):
    """``rope_scaling`` in config.json reaches upstream's RoPE (transformers' Qwen3 rotary); we honour 'linear'."""
    g, meta = rope_golden
    scaling = json.loads(meta["rope_scaling_override"])
    assert scaling == {"rope_type": "linear", "factor": 2.0}
    scaled = tiny_model(rope_scaling=scaling)
    v, states = rope_cases(scaled, g)
    close(v, g["dec_T40.out.velocity"])
    close(states, g["enc.out.encoder_hidden_states"])
    with torch.no_grad():
        quantized, indices = scaled.tokenizer(g["tok.in.x"])
        detok = scaled.detokenize(g["tok.out.quantized"])
    assert torch.equal(indices.long(), g["tok.out.indices"].long())
    close(quantized, g["tok.out.quantized"])
    close(detok, g["tok.out.detokenized"])
    # and the scaling is not a no-op: the unscaled model is far off
    v0, states0 = rope_cases(tiny_model(), g)
    assert (v0 - g["dec_T40.out.velocity"]).abs().max() > 1e-2
    assert (states0 - g["enc.out.encoder_hidden_states"]).abs().max() > 1e-2
