"""Band-limited resampling: a Kaiser-windowed sinc filter applied in polyphase form with ``conv1d``.

For rates whose ratio reduces to small integers (every common rate against 48 kHz) the filter bank is exact;
for odd rates (ratio numerator above ``MAX_PHASES``) the caller falls back to FFmpeg's swresample.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

ZERO_CROSSINGS = 64  # filter half-length in zero crossings of the sinc: sharper transition, more taps
ROLLOFF = 0.945  # pass band edge as a fraction of the lower Nyquist frequency
KAISER_BETA = 14.0  # stop band around -140 dB
MAX_PHASES = 4096
_BLOCK = 1 << 21  # output samples per conv call, to bound memory on long files


def ratio(orig: int, new: int) -> tuple[int, int]:
    g = math.gcd(orig, new)
    return new // g, orig // g  # (up L, down M)


def supported(orig: int, new: int) -> bool:
    return ratio(orig, new)[0] <= MAX_PHASES


@lru_cache(maxsize=16)
def _kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Filter bank [L, taps] and the left padding (in input samples) for the L output phases."""
    up, down = ratio(orig, new)
    cutoff = ROLLOFF * min(up, down) / down  # cycles per input sample × 2 (1.0 = input Nyquist)
    half = math.ceil(ZERO_CROSSINGS / cutoff)  # input samples each side of the centre
    # Output phase p sits at input position p·M/L (+ the block's base index); taps cover [-half, half + M).
    n = torch.arange(-half, half + down, dtype=torch.float64)
    phase = torch.arange(up, dtype=torch.float64)[:, None] * down / up
    t = n[None, :] - phase  # distance from each tap to the output instant, in input samples
    window = torch.special.i0(KAISER_BETA * torch.sqrt((1 - (t / (half + 1)) ** 2).clamp(min=0))) / torch.special.i0(
        torch.tensor(KAISER_BETA, dtype=torch.float64)
    )
    taps = cutoff * torch.sinc(cutoff * t) * window
    return taps.float(), half


def resample(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Resample [C, S] float32 from ``orig`` Hz to ``new`` Hz; the output has ceil(S · new / orig) samples."""
    if orig == new:
        return x
    up, down = ratio(orig, new)
    taps, half = _kernel(orig, new)
    n_out = -(-x.shape[-1] * up // down)
    blocks = -(-n_out // up)  # conv outputs: one block of `up` samples per `down` input samples
    pad_right = max(0, (blocks - 1) * down + taps.shape[1] - half - x.shape[-1])
    padded = torch.nn.functional.pad(x.float()[:, None, :], (half, pad_right))
    weight = taps[:, None, :]
    out = []
    step = max(1, _BLOCK // up)
    for b0 in range(0, blocks, step):
        b1 = min(blocks, b0 + step)
        seg = padded[..., b0 * down: (b1 - 1) * down + taps.shape[1]]
        y = torch.nn.functional.conv1d(seg, weight, stride=down)  # [C, L, blocks]
        out.append(y.transpose(1, 2).reshape(x.shape[0], -1))
    return torch.cat(out, dim=-1)[:, :n_out].contiguous()
