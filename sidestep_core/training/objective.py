"""The flow-matching objective of ACE-Step 1.5: timesteps, CFG dropout, noising and the masked loss.

``x_t = t·noise + (1 − t)·x0``, target ``noise − x0``, MSE; ``r = t`` (MeanFlow is dormant in every released model).
All random draws take an explicit ``torch.Generator`` so a step's randomness is a function of (seed, step) and
resuming reproduces it exactly.
"""

from __future__ import annotations

from typing import Optional

import torch

# The upstream community trainer's table: the turbo sampler's 8 timesteps at shift 3.
TURBO_SHIFT3_TIMESTEPS = (
    1.0, 0.9545454545454546, 0.9, 0.8333333333333334, 0.75, 0.6428571428571429, 0.5, 0.3,
)


def sample_timesteps(
    n: int, mode: str, mu: float, sigma: float, generator: torch.Generator
) -> torch.Tensor:
    """``t`` for ``n`` samples, fp32 on the generator's device.

    ``continuous`` is the model's own ``sample_t_r`` with ``use_meanflow=False``: two logit-normal draws, t = the
    larger, and r = t for every sample (so only t is returned). ``logit_normal`` is a single draw.
    """
    dev = generator.device
    if mode == "continuous":
        a = torch.randn(n, generator=generator, device=dev) * sigma + mu
        b = torch.randn(n, generator=generator, device=dev) * sigma + mu
        return torch.maximum(torch.sigmoid(a), torch.sigmoid(b))
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=dev) * sigma + mu)
    if mode == "discrete":
        table = torch.tensor(TURBO_SHIFT3_TIMESTEPS, dtype=torch.float32, device=dev)
        return table[torch.randint(len(table), (n,), generator=generator, device=dev)]
    if mode == "uniform":
        return torch.rand(n, generator=generator, device=dev)
    raise ValueError(f"timestep_mode: unknown mode {mode!r}")


def cfg_drop_mask(n: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Per-sample bool: True where the condition is replaced by the null condition."""
    draw = torch.rand(n, generator=generator, device=generator.device)
    return draw < ratio


def apply_cfg_dropout(
    encoder_hidden_states: torch.Tensor, drop: torch.Tensor, null_condition_emb: torch.Tensor
) -> torch.Tensor:
    """Replace the whole condition sequence of the dropped samples (text, lyrics and timbre), as the model's own
    forward does; the attention mask is left as it is (the DiT ignores it)."""
    if not bool(drop.any()):
        return encoder_hidden_states
    null = null_condition_emb.to(encoder_hidden_states).expand_as(encoder_hidden_states)
    return torch.where(drop.to(encoder_hidden_states.device)[:, None, None], null, encoder_hidden_states)


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x_t, target)``."""
    tb = t.to(x0.dtype)[:, None, None]
    return tb * noise + (1 - tb) * x0, noise - x0


def masked_mse(pred: torch.Tensor, target: torch.Tensor, frame_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean squared error over real frames only (fp32).

    ``frame_mask`` [B, T] marks real frames; padded frames of shorter clips in a batch are excluded (upstream
    averages over them). With no padding this is exactly ``F.mse_loss`` (same reduction, same order).
    """
    diff = (pred.float() - target.float()).square()
    if frame_mask is None or bool(frame_mask.all()):
        return diff.mean()
    m = frame_mask.to(diff.dtype)[:, :, None]
    return (diff * m).sum() / (m.sum() * diff.shape[-1])


class Objective:
    """One micro-batch's loss: draws t, the CFG drop mask and the noise (in that order) from ``generator``.

    ``compute_dtype`` is the autocast dtype (None = fp32, no autocast). t is rounded to it before use, as the released
    pipeline draws t in bf16 and the DiT embeds the rounded value; x_t is built from the same rounded t.
    """

    def __init__(self, mode: str, mu: float, sigma: float, cfg_ratio: float,
                 null_condition_emb: torch.Tensor, compute_dtype: Optional[torch.dtype] = None):
        self.mode, self.mu, self.sigma, self.cfg_ratio = mode, mu, sigma, cfg_ratio
        self.null = null_condition_emb.detach()
        self.compute_dtype = compute_dtype

    def __call__(self, model, batch, generator: torch.Generator, cfg_ratio: Optional[float] = None):
        """Return ``(loss fp32 scalar, t [B] fp32 on CPU)``. ``batch`` is a ``data.Batch`` already on the device."""
        x0 = batch.target_latents
        b, device = x0.shape[0], x0.device
        ratio = self.cfg_ratio if cfg_ratio is None else cfg_ratio
        t = sample_timesteps(b, self.mode, self.mu, self.sigma, generator)
        drop = cfg_drop_mask(b, ratio, generator) if ratio > 0 else torch.zeros(b, dtype=torch.bool)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32)
        t_model = t.to(self.compute_dtype) if self.compute_dtype is not None else t
        t_used = t_model.float()
        x_t, target = noisy_input(x0.float(), noise.to(device), t_used.to(device))
        cond = apply_cfg_dropout(batch.encoder_hidden_states, drop, self.null)
        t_dev = t_model.to(device)
        with torch.autocast(device.type, dtype=self.compute_dtype or torch.float32,
                            enabled=self.compute_dtype is not None):
            pred = model(hidden_states=x_t, timestep=t_dev, timestep_r=t_dev, encoder_hidden_states=cond,
                         context_latents=batch.context_latents)
        return masked_mse(pred, target, batch.frame_mask if batch.padded else None), t_used
