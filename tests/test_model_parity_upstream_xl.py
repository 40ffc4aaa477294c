"""Our model against golden outputs of upstream's XL modeling files on the ``tiny-xl`` checkpoint
(tests/data/README.md says how they were made)."""

import json

import pytest
import torch

from sidestep_core.model import load_acestep
from sidestep_core.tiny import get_profile, make_tiny_checkpoint
from sidestep_core.tiny.writer import dit_state

from goldens import assert_close as close
from goldens import (check_condition_encoder, check_decoder_velocity, check_tokenizer_and_detokenizer, encode,
                     read_golden, tiny_model)

PROFILE = get_profile("tiny-xl")


def state_sha256(sd) -> str:
    """The golden driver's content hash of the weights it ran on (sorted names, fp32 bytes)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].to(torch.float32).contiguous()
        h.update(k.encode() + str(list(t.shape)).encode() + t.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def golden():
    return read_golden("upstream_golden_xl_tiny.safetensors")


@pytest.fixture(scope="module")
def state():
    return dit_state(PROFILE, 0)


@pytest.fixture(scope="module")
def model():
    return tiny_model("tiny-xl")


def test_golden_was_made_from_our_generator(golden, state):
    _, meta = golden
    assert meta["modeling_file"] == "acestep/models/xl_turbo/modeling_acestep_v15_xl_turbo.py"
    assert json.loads(meta["config_json"]) == json.loads(json.dumps(PROFILE.dit.to_dict()))
    assert meta["checkpoint_state_sha256"] == state_sha256(state)
    # xl_base and xl_sft gave the very same module outputs (they differ from xl_turbo only in generate_audio)
    for other in ("xl_base", "xl_sft"):
        assert max(json.loads(meta[f"check_xl_turbo_vs_{other}_modeling_max_abs_diff"]).values()) == 0.0


def test_profile_is_xl_shaped():
    cfg = PROFILE.dit
    assert cfg.is_xl and cfg.hidden_size > cfg.encoder_hidden_size
    assert cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size  # as XL: 32 × 128 heads on 2560
    assert not get_profile("tiny").dit.is_xl
    # ComfyUI's smallest loadable model has a narrow decoder under a wide encoder: a 2B model, not XL
    assert not get_profile("comfyui-min").dit.is_xl


@pytest.mark.parametrize("case", ["dec_T37", "dec_T40", "dec_T37_r"])
def test_decoder_velocity(golden, model, case):
    check_decoder_velocity(model, golden[0], case)


@pytest.mark.parametrize("case", ["enc", "enc1", "enc_lpad"])
def test_condition_encoder(golden, model, case):
    check_condition_encoder(model, golden[0], case)


def test_timbre_reads_the_prepended_special_token(golden, model):
    """Without the XL timbre path (the 2B rule: first frame, special_token unused) the timbre slots move,
    as upstream's 2B modeling file on these weights shows in the golden's metadata."""
    g, meta = golden
    info = json.loads(meta["info_xl_turbo_vs_turbo_modeling_max_abs_diff"])
    assert info["enc.encoder_hidden_states"] > 0.1 and info["dec_T40.velocity"] == 0.0
    ref = g["enc.out.encoder_hidden_states"]
    model.encoder.timbre_encoder.cls_token = False
    try:
        states, _ = encode(model, g, "enc")
    finally:
        model.encoder.timbre_encoder.cls_token = True
    assert (states - ref).abs().max() > 0.1 * ref.abs().max()


def test_audio_tokenizer_and_detokenizer(golden, model):
    check_tokenizer_and_detokenizer(model, golden[0])


@pytest.mark.parametrize("layout", ["original", "comfyui-split"])
def test_written_xl_checkpoint_loads_and_matches(tmp_path, golden, layout):
    """The generator writes tiny XL in the real formats (original: sharded folder); the loader takes it as XL."""
    g, _ = golden
    ckpt = make_tiny_checkpoint(tmp_path, layout, "tiny-xl", 0)
    if layout == "original":
        assert (ckpt.dit / "model.safetensors.index.json").is_file() and ckpt.dit.name == "acestep-v15-xl-turbo"
    loaded = load_acestep(ckpt.dit, dtype=torch.float32, parts={"encoder"})
    assert loaded.info.variant == "xl-turbo" and loaded.info.is_xl
    assert loaded.model.encoder.timbre_encoder.cls_token
    states, _ = encode(loaded.model, g, "enc")
    close(states, g["enc.out.encoder_hidden_states"])
