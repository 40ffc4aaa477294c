"""Optional loudness normalisation: none, peak to -1 dBFS, or integrated loudness to -14 LUFS (pyloudnorm).

LUFS mode keeps a -1 dBFS peak ceiling, so quiet-but-peaky material is never pushed into clipping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("none", "peak", "lufs")
DEFAULT_PEAK_DB = -1.0
DEFAULT_LUFS = -14.0
_MIN_LUFS_SECONDS = 0.4  # one BS.1770 gating block; shorter clips fall back to peak normalisation


@dataclass
class LoudnessResult:
    waveform: torch.Tensor
    gain_db: float
    measured: float | None  # LUFS (lufs mode) or peak dBFS (peak mode); None for "none"
    note: str = ""


def _db_to_gain(db: float) -> float:
    return 10 ** (db / 20)


def normalize(
    wave: torch.Tensor,
    sample_rate: int,
    mode: str = "none",
    *,
    peak_db: float = DEFAULT_PEAK_DB,
    lufs: float = DEFAULT_LUFS,
) -> LoudnessResult:
    """Apply ``mode`` to stereo [2, S] float32 audio. Silent input is returned unchanged."""
    if mode not in MODES:
        raise ValueError(f"unknown loudness normalisation {mode!r}; choose one of {', '.join(MODES)}")
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    if mode == "none" or peak == 0.0:
        return LoudnessResult(wave, 0.0, None)
    peak_dbfs = 20 * math.log10(peak)
    ceiling_gain_db = peak_db - peak_dbfs
    if mode == "peak" or wave.shape[-1] < _MIN_LUFS_SECONDS * sample_rate:
        note = "" if mode == "peak" else "too short for LUFS; peak-normalised instead"
        return LoudnessResult(wave * _db_to_gain(ceiling_gain_db), ceiling_gain_db, peak_dbfs, note)
    measured = measure_lufs(wave, sample_rate)
    if measured is None:  # gated away entirely (near-silence)
        return LoudnessResult(wave * _db_to_gain(ceiling_gain_db), ceiling_gain_db, peak_dbfs,
                              "loudness below the gate; peak-normalised instead")
    gain_db = lufs - measured
    note = ""
    if gain_db > ceiling_gain_db:
        gain_db, note = ceiling_gain_db, f"limited by the {peak_db:g} dBFS peak ceiling"
    return LoudnessResult(wave * _db_to_gain(gain_db), gain_db, measured, note)


def measure_lufs(wave: torch.Tensor, sample_rate: int) -> float | None:
    """Integrated loudness (BS.1770) of [2, S] audio; None when too short or gated away (near-silence)."""
    if wave.shape[-1] < _MIN_LUFS_SECONDS * sample_rate:
        return None
    import pyloudnorm

    meter = pyloudnorm.Meter(sample_rate)
    measured = float(meter.integrated_loudness(wave.transpose(0, 1).double().numpy()))
    return measured if math.isfinite(measured) else None
