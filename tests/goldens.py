"""Shared by the upstream parity tests: reading a golden file and the tiny model its outputs were computed with.
Not a test module."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors import safe_open

from sidestep_core.model import AceStepModel
from sidestep_core.tiny import get_profile
from sidestep_core.tiny.writer import dit_state

DATA = Path(__file__).parent / "data"


def read_golden(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(DATA / name), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


ENCODER_INPUTS = ["text_hidden_states", "text_attention_mask", "lyric_hidden_states", "lyric_attention_mask",
                  "refer_audio_acoustic_hidden_states_packed", "refer_audio_order_mask"]


def tiny_model(profile: str = "tiny", **config_changes) -> AceStepModel:
    """The goldens' weights, regenerated from the seed, in fp32; ``config_changes`` leave the shapes alone."""
    prof = get_profile(profile)
    m = AceStepModel(dataclasses.replace(prof.dit, **config_changes))
    m.load_state_dict(dit_state(prof, 0))
    return m.eval()


def encode(model: AceStepModel, g: dict, case: str):
    """The condition encoder on a golden case's inputs: (hidden states, attention mask)."""
    with torch.no_grad():
        return model.encoder(*(g[f"{case}.in.{n}"] for n in ENCODER_INPUTS))


def check_decoder_velocity(model: AceStepModel, g: dict, case: str) -> None:
    with torch.no_grad():
        v = model.decoder(**{n: g[f"{case}.in.{n}"] for n in ("hidden_states", "timestep", "timestep_r",
                                                                 "encoder_hidden_states", "context_latents")})
    assert_close(v, g[f"{case}.out.velocity"], what=case)


def check_condition_encoder(model: AceStepModel, g: dict, case: str) -> None:
    states, mask = encode(model, g, case)
    assert torch.equal(mask, g[f"{case}.out.encoder_attention_mask"])
    assert_close(states, g[f"{case}.out.encoder_hidden_states"], what=case)


def check_tokenizer_and_detokenizer(model: AceStepModel, g: dict) -> None:
    with torch.no_grad():
        quantized, indices = model.tokenizer(g["tok.in.x"])
        detok = model.detokenize(g["tok.out.quantized"])
    assert torch.equal(indices.long(), g["tok.out.indices"].long())
    assert_close(quantized, g["tok.out.quantized"], what="quantized")
    assert_close(detok, g["tok.out.detokenized"], what="detokenized")


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """Max abs error within ``rtol`` of the reference's largest magnitude."""
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} vs scale {scale:.3g}"
