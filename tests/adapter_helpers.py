"""Shared helpers for the adapter tests: real PEFT / LyCORIS adapters on the tiny decoder, and their reference
merged weights taken from the libraries themselves. Not a test module."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch

DIT = "acestep-v15-turbo"

# (adapter type, TrainConfig overrides): every layout the trainer can produce, including low-rank LoKr factors with
# a scale other than 1, Kronecker factors on both sides, OFT with a norm constraint and a rescale.
CASES = {
    "lora": ("lora", {}),
    "lora_patterns": ("lora", {"rank_pattern": {r"layers\.0\.self_attn\.q_proj": 8},
                               "alpha_pattern": {r"layers\.1\.mlp\.up_proj": 3.0}}),
    "dora": ("dora", {}),
    "lokr_full": ("lokr", {}),
    "lokr_lowrank": ("lokr", {"rank": 2, "alpha": 8.0}),
    "lokr_both": ("lokr", {"rank": 2, "alpha": 6.0, "lokr_decompose_both": True, "lokr_factor": 4}),
    "loha": ("loha", {}),
    "oft": ("oft", {}),
    "oft_rescaled": ("oft", {"oft_rescaled": True, "oft_constraint": 1e-4}),
}


def decoder(dit: Path, dtype=torch.float32):
    from sidestep_core.model import load_acestep

    return load_acestep(dit, dtype=dtype, parts={"decoder"}).model.decoder


def make_adapter(dec, kind: str, seed: int = 1, noise: float = 0.05, **overrides):
    """A trainer adapter on ``dec`` with every weight moved away from its initial value (so zero-initialised
    factors do not hide mistakes)."""
    from sidestep_core.config import TrainConfig
    from sidestep_core.training.adapters import inject_adapter

    kw = dict(adapter=kind, rank=4, alpha=8.0, dropout=0.0, target_mlp=True, oft_block_size=8)
    kw.update(overrides)
    cfg = TrainConfig(**kw)
    torch.manual_seed(seed)
    adapter = inject_adapter(dec, cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return adapter


def reference_weights(adapter, dec) -> dict[str, torch.Tensor]:
    """The effective weight of every target as the library computes it: PEFT's merge_and_unload, or the LyCORIS
    module's own forward pass (fed the identity matrix). Consumes the adapter (PEFT unwraps the decoder)."""
    ref = {}
    adapter.module.eval()
    with torch.no_grad():
        if adapter.peft_model is not None:
            merged = adapter.peft_model.merge_and_unload()
            for name in adapter.targets:
                ref[name] = merged.get_submodule(name).weight.detach().float().clone()
        else:
            for name in adapter.targets:
                lin = dec.get_submodule(name)
                eye = torch.eye(lin.in_features)
                out = lin(eye)
                if lin.bias is not None:
                    out = out - lin.bias
                ref[name] = out.T.detach().float().clone()
    return ref


def saved_adapter(tmp: Path, dit: Path, case: str, seed: int = 1) -> tuple[Path, dict[str, torch.Tensor]]:
    """Save a trainer adapter of ``case`` to ``tmp/case`` in the trainer's on-disk format; return the folder and
    the library's reference merged weights."""
    kind, overrides = CASES[case]
    dec = decoder(dit)
    adapter = make_adapter(dec, kind, seed=seed, **overrides)
    folder = tmp / case
    adapter.save(folder, {"sidestep_adapter": f'"{kind}"', "sidestep_base_variant": '"turbo"'})
    return folder, reference_weights(adapter, dec)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def max_rel_err(ours: dict, ref: dict, names: Optional[list] = None) -> float:
    names = names if names is not None else list(ref)
    assert set(names) <= set(ours), sorted(set(names) - set(ours))[:3]
    return max(rel_err(ours[n], ref[n]) for n in names)


class _Lines(logging.Handler):
    def __init__(self, level: int):
        super().__init__(level)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def log_lines(name: Optional[str] = None, level: int = logging.DEBUG):
    """The messages logged to logger ``name`` (None: the root) at ``level`` or above while the block runs."""
    handler, log = _Lines(level), logging.getLogger(name)
    old = log.level
    log.addHandler(handler)
    log.setLevel(level)
    try:
        yield handler.lines
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
