"""The loss curve as a ComfyUI IMAGE ([1, H, W, 3], values 0..1); the drawing is the core's (``OUT/loss.png``)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from sidestep_core.training.chart import read_loss_csv, render_loss_image

__all__ = ["read_loss_csv", "render_loss_curve"]


def render_loss_curve(steps: Sequence[int], loss: Sequence[float], smoothed: Optional[Sequence[float]] = None,
                      title: str = "", width: int = 768, height: int = 384) -> torch.Tensor:
    img = render_loss_image(steps, loss, smoothed, title, width, height)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
