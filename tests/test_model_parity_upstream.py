"""Our model against golden outputs of the upstream ACE-Step 1.5 code (tests/data/README.md says how they were made)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sidestep_core.model import AceStepModel
from sidestep_core.tiny import get_profile
from sidestep_core.tiny.writer import dit_state



GOLDEN = Path(__file__).parent / "data" / "upstream_golden_tiny.safetensors"


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def model():
    """The same weights the goldens were computed with, regenerated from the seed, in fp32."""
    m = AceStepModel(get_profile("tiny").dit)
    m.load_state_dict(dit_state(get_profile("tiny"), 0))
    return m.eval()


def close(ours, ref, rtol=1e-5):
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3g} vs scale {scale:.3g}"


def test_golden_was_made_from_our_generator_config(golden):
    _, meta = golden
    cfg = json.loads(meta["config_json"])
    ours = get_profile("tiny").dit.to_dict()
    for key in ("hidden_size", "num_hidden_layers", "sliding_window", "num_key_value_heads", "text_hidden_dim"):
        assert cfg[key] == ours[key], key


@pytest.mark.parametrize("case", ["dec_T37", "dec_T40", "dec_T37_r"])
def test_decoder_velocity(golden, model, case):
    g, _ = golden
    with torch.no_grad():
        v = model.decoder(
            hidden_states=g[f"{case}.in.hidden_states"],
            timestep=g[f"{case}.in.timestep"],
            timestep_r=g[f"{case}.in.timestep_r"],
            encoder_hidden_states=g[f"{case}.in.encoder_hidden_states"],
            context_latents=g[f"{case}.in.context_latents"],
        )
    close(v, g[f"{case}.out.velocity"])


@pytest.mark.parametrize("case", ["enc", "enc1"])
def test_condition_encoder(golden, model, case):
    g, _ = golden
    names = ["text_hidden_states", "text_attention_mask", "lyric_hidden_states", "lyric_attention_mask",
             "refer_audio_acoustic_hidden_states_packed", "refer_audio_order_mask"]
    with torch.no_grad():
        states, mask = model.encoder(*(g[f"{case}.in.{n}"] for n in names))
    assert torch.equal(mask, g[f"{case}.out.encoder_attention_mask"])
    close(states, g[f"{case}.out.encoder_hidden_states"])


def test_audio_tokenizer_and_detokenizer(golden, model):
    g, _ = golden
    with torch.no_grad():
        quantized, indices = model.tokenizer(g["tok.in.x"])
        detok = model.detokenize(g["tok.out.quantized"])
    assert torch.equal(indices.long(), g["tok.out.indices"].long())
    close(quantized, g["tok.out.quantized"])
    close(detok, g["tok.out.detokenized"])
