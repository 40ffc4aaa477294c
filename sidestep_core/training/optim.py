"""Optimizers (AdamW, AdamW8bit, Adafactor, Prodigy) and learning-rate schedules.

Every schedule is one ``LambdaLR`` whose factor is a pure function of the step, so its saved state is two numbers
and a resumed run follows exactly the same curve.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..config import TrainConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ValueError("adapter: no trainable parameters")
    lr, wd = cfg.learning_rate, cfg.weight_decay
    if cfg.optimizer == "adamw":
        fused = all(p.is_cuda and p.dtype == torch.float32 for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=fused or None)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # type: ignore
        except Exception as exc:  # ImportError, or a bitsandbytes build that fails to load its library
            raise ValueError(
                "optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes; CUDA builds on Linux/Windows). "
                f"It could not be imported ({exc}); choose --optimizer adamw instead"
            ) from exc
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=wd)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, weight_decay=wd, betas=(0.9, 0.99), safeguard_warmup=True,
                       use_bias_correction=True)
    raise ValueError(f"optimizer: unknown optimizer {cfg.optimizer!r}")


def effective_warmup(cfg: TrainConfig, total_steps: int) -> int:
    """Warmup capped at a tenth of the run (as upstream and Side-Step do), so short runs still reach the peak."""
    if cfg.warmup_steps <= 0 or cfg.scheduler == "constant":
        return 0
    return min(cfg.warmup_steps, max(1, total_steps // 10))


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float, cycles: int) -> float:
    """LR multiplier used for optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "cosine_restarts":
        cyc = (progress * cycles) % 1.0 if progress < 1.0 else 1.0
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * cyc))
    raise ValueError(f"scheduler: unknown schedule {kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    warmup = effective_warmup(cfg, total_steps)
    kind, min_ratio, cycles = cfg.scheduler, cfg.min_lr_ratio, cfg.scheduler_cycles

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup, kind, min_ratio, cycles)

    return LambdaLR(optimizer, factor)
