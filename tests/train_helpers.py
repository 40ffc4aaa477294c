"""Shared helpers for the training tests: a tiny checkpoint and synthetic preprocessed caches."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sidestep_core.config import TrainConfig


def make_checkpoint(root: Path) -> Path:
    """The tiny turbo checkpoint (original layout); returns the DiT folder."""
    from sidestep_core.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(root, layout="original", profile="tiny", seed=0)
    return root / "acestep-v15-turbo"


def make_cache(root: Path, frames=(40, 56), cond_len=(6, 9), hidden: int = 64, seed: int = 0,
               trigger: str = "tst", repeat=None, metadata=None) -> Path:
    """A preprocessed cache written with the cache module's own writers (manifest + one safetensors per clip:
    target_latents [T,64], encoder_hidden_states [L,H], encoder_attention_mask [L], context_latents [T,128]).
    Latents are smooth, learnable patterns so overfitting shows. ``metadata``: per clip, more of its record
    (caption, lyrics, … as preprocessing resolves them)."""
    from sidestep_core.data import cache

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, (t, length) in enumerate(zip(frames, cond_len)):
        pos = torch.arange(t, dtype=torch.float32)[:, None]
        freq = torch.linspace(0.05, 0.6, 64)[None, :] * (1 + i)
        lat = torch.sin(pos * freq + torch.rand(1, 64, generator=g) * 2 * math.pi) * 1.5
        ctx = torch.cat([torch.randn(1, 64, generator=g).expand(t, 64) * 0.1, torch.ones(t, 64)], dim=-1)
        key = cache.content_key(test=f"{seed}-{i}-{t}-{length}")
        record = {"key": key, "id": f"clip{i:02d}", "file": cache.sample_filename(key), "frames": t,
                  "duration": t / 25, "custom_tag": trigger, "repeat": (repeat[i] if repeat else 1),
                  **(metadata[i] if metadata else {})}
        cache.write_tensors(root / record["file"], {
            "target_latents": lat,
            "context_latents": ctx,
            "encoder_hidden_states": torch.randn(length, hidden, generator=g),
            "encoder_attention_mask": torch.ones(length, dtype=torch.bool),
        }, record)
        samples.append(record)
    cache.write_manifest(root, {"format": cache.FORMAT, "format_version": cache.FORMAT_VERSION,
                                "num_samples": len(samples), "samples": samples})
    return root


def stop_after(n: int):
    """A ``should_stop`` for ``train`` that asks to stop when it is asked the ``n``-th time (after step ``n``)."""
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    return should_stop


def fast_config(**kw) -> TrainConfig:
    """Settings for seconds-long CPU runs on the tiny model."""
    base = dict(rank=4, alpha=4.0, dropout=0.0, precision="fp32", optimizer="adamw", learning_rate=1e-2,
                warmup_steps=0, scheduler="constant", max_steps=6, save_every=0, crop_seconds=0,
                cfg_ratio=0.15, tensorboard=False, estimate_steps=0, device="cpu", oft_block_size=8,
                gradient_checkpointing=True)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: on a shared 2-core machine, 2 threads make tiny matmuls ~500× slower (spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cli(*args: str) -> int:
    from sidestep_core.cli import main

    return main(["train", *args])
