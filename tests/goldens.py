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


def tiny_model(**config_changes) -> AceStepModel:
    """The goldens' weights, regenerated from the seed, in fp32; ``config_changes`` leave the shapes alone."""
    profile = get_profile("tiny")
    m = AceStepModel(dataclasses.replace(profile.dit, **config_changes))
    m.load_state_dict(dit_state(profile, 0))
    return m.eval()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """Max abs error within ``rtol`` of the reference's largest magnitude."""
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} vs scale {scale:.3g}"
