"""``sidestep demo``: run the pipeline on the embedded tiny model and say where each output went."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..model import load_acestep
from ..tiny.writer import default_demo_checkpoint, describe


def register(sub, name):
    p = sub.add_parser(name, help="run the pipeline on the embedded tiny model",
                       description="Write (once) a deterministic tiny ACE-Step 1.5 checkpoint in the original "
                       "layout and run the pipeline on it. Nothing is downloaded.")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the tiny model is kept (default: ~/.cache/sidestep)")
    return p


def run(args) -> int:
    t0 = time.perf_counter()
    ckpt = default_demo_checkpoint(args.cache_dir)
    print("model:", describe(ckpt))
    loaded = load_acestep(ckpt.dit, dtype=torch.float32)
    info = loaded.info
    print(f"loaded {info.variant} (identity {info.identity}): recommended shift {info.shift}, {info.steps} steps")
    frames = 50  # two seconds of latents
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, frames, 64, generator=g)
    ctx = loaded.model.text2music_context(loaded.silence_latent, frames)
    cond = loaded.model.null_condition_emb.expand(1, 8, -1)
    t = torch.tensor([0.5])
    with torch.no_grad():
        v = loaded.model.decoder(x, t, t, cond, ctx)
    print(f"decoder forward: latents {tuple(x.shape)} -> velocity {tuple(v.shape)}, "
          f"mean |v| {v.abs().mean():.4f}, {time.perf_counter() - t0:.1f} s in all")
    return 0
