"""Flow-matching samplers of ACE-Step 1.5: schedules, the Euler loop, CFG through the null condition, APG.

Pure tensor functions: they take the decoder (anything called as ``decoder(hidden_states=…, timestep=…,
timestep_r=…, encoder_hidden_states=…, context_latents=…)`` returning the velocity), the packed condition, the
context latents and the initial noise, and return the clean latents ``x0`` [B, T, 64]. No text encoder, VAE or file
is involved, so the loops are checked against golden outputs of upstream ``generate_audio``
(tests/test_sampling_parity.py).

Conventions (acestep15.md §3.3): ``x_t = t·noise + (1 − t)·x0``; the decoder predicts ``v = noise − x0``; an
Euler step is ``x ← x − v·(t_cur − t_next)``. Every tensor (noise, schedule, step sizes, the update) is kept in
``context_latents.dtype``, as upstream does, so a bf16 model samples in bf16.

* **Turbo**: a fixed 8-step table per shift (1, 2 or 3; other shifts snap to the nearest), no CFG; the last step
  jumps straight to ``x0 = x − v·t``. Custom timesteps are snapped to the 20 values of the tables.
* **Base / SFT**: ``t = linspace(1, 0, steps + 1)`` warped by ``s·t / (1 + (s − 1)·t)``; with guidance > 1 the batch
  is doubled with ``null_condition_emb`` replacing the whole condition sequence, and inside the CFG interval
  (inclusive, on the warped t) the two predictions are combined with APG (momentum −0.75 shared over the run,
  norm clamp 2.5 and projection over the *time* axis, eta 0).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

Decoder = Callable[..., torch.Tensor]
Progress = Callable[[dict], None]

TURBO_SHIFTS = (1.0, 2.0, 3.0)
TURBO_STEPS = 8
TURBO_MAX_CUSTOM_STEPS = 20
APG_MOMENTUM = -0.75
APG_NORM_THRESHOLD = 2.5
APG_DIMS = (1,)  # the time axis of [B, T, C] latents


# ----------------------------------------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------------------------------------


def shift_timestep(t: float, shift: float) -> float:
    """The shift warp ``s·t / (1 + (s − 1)·t)`` on a python float."""
    return shift * t / (1 + (shift - 1) * t)


def _exact_warp(u: Fraction, shift: int) -> float:
    s = Fraction(shift)
    return float(s * u / (1 + (s - 1) * u))


def turbo_table(shift: float) -> list[float]:
    """The 8 turbo timesteps for shift 1, 2 or 3 (final 0 excluded): the warp of u = 1, 7/8, …, 1/8, each the
    correctly rounded double of the exact rational (identical to upstream's literal tables)."""
    if shift not in TURBO_SHIFTS:
        raise ValueError(f"turbo shift must be one of {TURBO_SHIFTS}, not {shift}")
    return [_exact_warp(Fraction(TURBO_STEPS - i, TURBO_STEPS), int(shift)) for i in range(TURBO_STEPS)]


def turbo_valid_timesteps() -> list[float]:
    """The 20 distinct values of the three turbo tables, largest first."""
    return sorted({t for s in TURBO_SHIFTS for t in turbo_table(s)}, reverse=True)


def snap_turbo_shift(shift: float) -> float:
    """Nearest supported turbo shift; ties go to the smaller (1.5 → 1, 2.5 → 2), as upstream's ``min``."""
    return min(TURBO_SHIFTS, key=lambda s: abs(s - shift))


def turbo_schedule(shift: float = 3.0, timesteps: Optional[Sequence[float]] = None) -> list[float]:
    """The turbo timesteps a run uses.

    ``timesteps`` (optional): trailing exact zeros are dropped, at most 20 are kept, and each value is snapped to
    the nearest of :func:`turbo_valid_timesteps` (ties to the larger); an empty list falls back to ``shift``.
    No sorting or de-duplication, as upstream.
    """
    if timesteps is not None:
        values = [float(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
        while values and values[-1] == 0:
            values.pop()
        if values:
            valid = turbo_valid_timesteps()
            return [min(valid, key=lambda v: abs(v - t)) for t in values[:TURBO_MAX_CUSTOM_STEPS]]
    return turbo_table(snap_turbo_shift(float(shift)))


def base_schedule(steps: int, shift: float = 1.0, *, dtype: torch.dtype = torch.float32,
                  device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """``steps + 1`` timesteps from 1 to 0 for the base/SFT sampler (tensor ops in ``dtype``, as upstream)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=dtype)
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    return t


# ----------------------------------------------------------------------------------------------------------
# guidance
# ----------------------------------------------------------------------------------------------------------


class MomentumBuffer:
    """Running average of the guidance difference: ``running ← diff + momentum · running`` (starts at 0)."""

    def __init__(self, momentum: float = APG_MOMENTUM):
        self.momentum = momentum
        self.running: Optional[torch.Tensor] = None

    def update(self, diff: torch.Tensor) -> torch.Tensor:
        self.running = diff if self.running is None else diff + self.momentum * self.running
        return self.running


def _project(v: torch.Tensor, onto: torch.Tensor, dims: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(parallel, orthogonal) parts of ``v`` relative to ``onto`` along ``dims``, computed in float64."""
    dtype = v.dtype
    v64 = v.double()
    unit = F.normalize(onto.double(), dim=list(dims))
    parallel = (v64 * unit).sum(dim=list(dims), keepdim=True) * unit
    return parallel.to(dtype), (v64 - parallel).to(dtype)


def apg(
    pred_cond: torch.Tensor,
    pred_uncond: torch.Tensor,
    guidance_scale: float,
    buffer: Optional[MomentumBuffer] = None,
    *,
    eta: float = 0.0,
    norm_threshold: float = APG_NORM_THRESHOLD,
    dims: Sequence[int] = APG_DIMS,
) -> torch.Tensor:
    """Adaptive projected guidance as ACE-Step 1.5 applies it.

    ``diff = cond − uncond`` goes through the momentum buffer, is scaled down to an L2 norm of at most
    ``norm_threshold`` over ``dims`` (per batch item and channel when ``dims`` is the time axis), split into the
    parts parallel and orthogonal to ``pred_cond``; the guided velocity is
    ``cond + (g − 1)·(orthogonal + eta·parallel)``.
    """
    diff = pred_cond - pred_uncond
    if buffer is not None:
        diff = buffer.update(diff)
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=list(dims), keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / norm)
    parallel, orthogonal = _project(diff, pred_cond, dims)
    return pred_cond + (guidance_scale - 1) * (orthogonal + eta * parallel)


def cfg(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Plain classifier-free guidance ``uncond + g·(cond − uncond)``."""
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


# ----------------------------------------------------------------------------------------------------------
# noise
# ----------------------------------------------------------------------------------------------------------

NOISE_MODES = ("comfyui", "acestep")


def make_noise(
    batch: int,
    frames: int,
    seed: Union[int, Sequence[Optional[int]], None],
    *,
    mode: str = "comfyui",
    channels: int = 64,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Initial noise [batch, frames, channels].

    ``comfyui``: drawn on the CPU in fp32 over ComfyUI's latent layout [B, 64, T] from ``seed`` (what ComfyUI's
    KSampler draws for an ACE-Step 1.5 latent of that length), then transposed; the same on every device.
    ``acestep``: upstream ``prepare_noise`` — a generator on ``device``, drawn directly in ``dtype`` over
    [B, T, 64]; an int seed draws the whole batch from one generator, a list seeds each item (None or < 0 draws
    from ``generator`` or the global RNG).
    ``generator``: used instead of a seed when ``seed`` is None (never touches the global RNG then).
    """
    if mode not in NOISE_MODES:
        raise ValueError(f"noise mode must be one of {', '.join(NOISE_MODES)}, not {mode!r}")
    device = torch.device(device)

    def draw(shape, seed_value, gen_device, gen_dtype):
        if seed_value is None or int(seed_value) < 0:
            if generator is not None:
                return torch.randn(shape, generator=generator, device=generator.device, dtype=gen_dtype)
            return torch.randn(shape, device=gen_device, dtype=gen_dtype)
        g = torch.Generator(device=gen_device).manual_seed(int(seed_value))
        return torch.randn(shape, generator=g, device=gen_device, dtype=gen_dtype)

    if mode == "comfyui":
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
        if len(seeds) == 1:
            noise = draw((batch, channels, frames), seeds[0], torch.device("cpu"), torch.float32)
        else:
            if len(seeds) != batch:
                raise ValueError(f"{len(seeds)} seeds for a batch of {batch}")
            noise = torch.cat([draw((1, channels, frames), s, torch.device("cpu"), torch.float32) for s in seeds])
        return noise.transpose(1, 2).contiguous().to(device=device, dtype=dtype)
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"{len(seed)} seeds for a batch of {batch}")
        return torch.cat([draw((1, frames, channels), s, device, dtype) for s in seed]).to(device)
    return draw((batch, frames, channels), seed, device, dtype).to(device)


# ----------------------------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------------------------


def _emit(progress: Optional[Progress], done: int, total: int, t: float) -> None:
    if progress is not None:
        progress({"stage": "sample", "done": done, "total": total, "t": t})


def sample_turbo(
    decoder: Decoder,
    encoder_hidden_states: torch.Tensor,
    context_latents: torch.Tensor,
    noise: torch.Tensor,
    *,
    shift: float = 3.0,
    timesteps: Optional[Sequence[float]] = None,
    progress: Optional[Progress] = None,
) -> torch.Tensor:
    """Turbo sampling (upstream ``generate_audio`` of the turbo model, ``infer_method="ode"``): ``x0`` [B, T, 64]."""
    dtype, device = context_latents.dtype, context_latents.device
    schedule = torch.tensor(turbo_schedule(shift, timesteps), dtype=dtype, device=device)
    steps = len(schedule)
    batch = noise.shape[0]
    ones = torch.ones((batch,), device=device, dtype=dtype)
    x = noise.to(device=device, dtype=dtype)
    with torch.no_grad():
        for i in range(steps):
            t = schedule[i].item()
            t_vec = t * ones
            v = decoder(hidden_states=x, timestep=t_vec, timestep_r=t_vec,
                        encoder_hidden_states=encoder_hidden_states, context_latents=context_latents)
            if i == steps - 1:
                x = x - v * t_vec[:, None, None]  # the final jump to x0
            else:
                dt = t - schedule[i + 1].item()
                x = x - v * (dt * ones)[:, None, None]
            _emit(progress, i + 1, steps, t)
    return x


def sample_base(
    decoder: Decoder,
    encoder_hidden_states: torch.Tensor,
    context_latents: torch.Tensor,
    noise: torch.Tensor,
    null_condition_emb: Optional[torch.Tensor],
    *,
    steps: int = 30,
    guidance_scale: float = 7.0,
    shift: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    guidance: str = "apg",
    progress: Optional[Progress] = None,
) -> torch.Tensor:
    """Base/SFT sampling (upstream base ``generate_audio``, ``infer_method="ode"``): ``x0`` [B, T, 64].

    ``guidance``: ``apg`` (upstream default) or ``cfg`` (plain CFG). Guidance is off when ``guidance_scale <= 1``.
    """
    if guidance not in ("apg", "cfg"):
        raise ValueError(f"guidance must be 'apg' or 'cfg', not {guidance!r}")
    dtype, device = context_latents.dtype, context_latents.device
    t = base_schedule(steps, shift, dtype=dtype, device=device)
    batch = noise.shape[0]
    do_cfg = guidance_scale > 1.0
    cond, ctx = encoder_hidden_states, context_latents
    if do_cfg:
        if null_condition_emb is None:
            raise ValueError("guidance_scale > 1 needs the model's null_condition_emb")
        cond = torch.cat([cond, null_condition_emb.to(cond).expand_as(cond)], dim=0)
        ctx = torch.cat([ctx, ctx], dim=0)
    start, end = cfg_interval
    buffer = MomentumBuffer()
    ones = torch.ones((batch,), device=device, dtype=dtype)
    ones_in = torch.ones((cond.shape[0],), device=device, dtype=dtype)
    x = noise.to(device=device, dtype=dtype)
    with torch.no_grad():
        for i in range(steps):
            t_curr, t_next = t[i], t[i + 1]
            x_in = torch.cat([x, x], dim=0) if do_cfg else x
            t_vec = t_curr * ones_in
            v = decoder(hidden_states=x_in, timestep=t_vec, timestep_r=t_vec, encoder_hidden_states=cond,
                        context_latents=ctx)
            if do_cfg:
                v_cond, v_uncond = v.chunk(2)
                if bool(t_curr >= start) and bool(t_curr <= end):
                    v = apg(v_cond, v_uncond, guidance_scale, buffer) if guidance == "apg" else \
                        cfg(v_cond, v_uncond, guidance_scale)
                else:
                    v = v_cond
            x = x - v * ((t_curr - t_next) * ones)[:, None, None]
            _emit(progress, i + 1, steps, float(t_curr))
    return x


def sample(
    decoder: Decoder,
    encoder_hidden_states: torch.Tensor,
    context_latents: torch.Tensor,
    noise: torch.Tensor,
    *,
    turbo: bool,
    null_condition_emb: Optional[torch.Tensor] = None,
    steps: Optional[int] = None,
    shift: Optional[float] = None,
    guidance_scale: Optional[float] = None,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    guidance: str = "apg",
    timesteps: Optional[Sequence[float]] = None,
    progress: Optional[Progress] = None,
) -> torch.Tensor:
    """Dispatch to the turbo or base sampler; ``None`` settings take the variant's defaults (turbo: shift 3;
    base: 30 steps, guidance 7, shift 1 — upstream's ``generate_audio`` defaults)."""
    if turbo:
        return sample_turbo(decoder, encoder_hidden_states, context_latents, noise,
                            shift=3.0 if shift is None else shift, timesteps=timesteps, progress=progress)
    return sample_base(
        decoder, encoder_hidden_states, context_latents, noise, null_condition_emb,
        steps=30 if steps is None else int(steps), guidance_scale=7.0 if guidance_scale is None else guidance_scale,
        shift=1.0 if shift is None else shift, cfg_interval=cfg_interval, guidance=guidance, progress=progress,
    )
