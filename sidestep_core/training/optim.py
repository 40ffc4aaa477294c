"""Optimizers (AdamW, AdamW8bit, Adafactor, Prodigy) and learning-rate schedules.

Every schedule is one ``LambdaLR`` whose factor is a pure function of the step and a small ``schedule`` dict (run
length, warmup, and the (step, progress) the decay runs from), saved with each checkpoint, so a resumed run follows
exactly the same curve — and a run whose length changes on resume continues its curve without a jump.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

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


def new_schedule(cfg: TrainConfig, total_steps: int) -> dict[str, Any]:
    """The schedule of a fresh run: its length, its warmup, and the anchor (step, progress) the decay runs from."""
    warmup = effective_warmup(cfg, total_steps)
    return {"total": total_steps, "warmup": warmup, "anchor_step": warmup, "anchor_progress": 0.0}


def schedule_progress(schedule: dict[str, Any], step: int) -> float:
    """How far along its decay the schedule is at ``step`` (0 at the end of warmup, 1 at the end of the run)."""
    a, p0 = schedule["anchor_step"], schedule["anchor_progress"]
    span = max(schedule["total"] - a, 1)
    return min(max(p0 + (1.0 - p0) * (step - a) / span, 0.0), 1.0)


def extend_schedule(schedule: dict[str, Any], step: int, total_steps: int) -> dict[str, Any]:
    """The schedule of a resumed run whose length changed: the warmup stays, and from ``step`` on the rest of the
    decay is spread over the new remaining steps, so the learning rate continues from where it is, without a jump,
    and reaches its final value at the new end. (A finished run that is extended keeps its final rate.)"""
    warmup = schedule["warmup"]
    if step < warmup:
        return {**schedule, "total": total_steps}
    return {"total": total_steps, "warmup": warmup, "anchor_step": step,
            "anchor_progress": schedule_progress(schedule, step)}


def lr_factor(step: int, schedule: dict[str, Any], kind: str, min_ratio: float, cycles: int) -> float:
    """LR multiplier used for optimizer step ``step`` (0-based)."""
    warmup = schedule["warmup"]
    if step < warmup:
        return (step + 1) / warmup
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = schedule_progress(schedule, step)
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "cosine_restarts":
        cyc = (progress * cycles) % 1.0 if progress < 1.0 else 1.0
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * cyc))
    raise ValueError(f"scheduler: unknown schedule {kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, schedule: dict[str, Any]) -> LambdaLR:
    kind, min_ratio, cycles = cfg.scheduler, cfg.min_lr_ratio, cfg.scheduler_cycles

    def factor(step: int) -> float:
        return lr_factor(step, schedule, kind, min_ratio, cycles)

    return LambdaLR(optimizer, factor)


def continue_at(scheduler: LambdaLR, optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> None:
    """After loading a checkpoint's optimizer state: put the schedule at ``step`` with the configured learning rate
    and weight decay (the saved optimizer state carries the old ones), exactly as an uninterrupted run would be."""
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.learning_rate
        if "weight_decay" in group:
            group["weight_decay"] = cfg.weight_decay
    scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    scheduler.last_epoch = step
    lrs = [base * lam(step) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
