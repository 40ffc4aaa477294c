"""Loudness normalisation: none, peak −1 dBFS, LUFS −14 with a peak ceiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sidestep_core.audio.loudness import normalize


def _noise(seconds=2.0, amp=0.05, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy((amp * rng.standard_normal((2, int(seconds * 48000)))).astype(np.float32))


def test_none_leaves_audio_alone():
    x = _noise()
    out = normalize(x, 48000, "none")
    assert out.waveform is x and out.gain_db == 0.0


def test_peak_normalises_to_minus_one_dbfs():
    out = normalize(_noise(), 48000, "peak")
    assert abs(20 * np.log10(float(out.waveform.abs().max())) + 1.0) < 1e-4


def test_lufs_reaches_the_target():
    import pyloudnorm

    out = normalize(_noise(amp=0.02), 48000, "lufs")
    measured = pyloudnorm.Meter(48000).integrated_loudness(out.waveform.T.double().numpy())
    assert abs(measured + 14.0) < 0.05
    assert float(out.waveform.abs().max()) <= 10 ** (-1 / 20) + 1e-6
    assert not out.note


def test_lufs_respects_the_peak_ceiling():
    x = torch.zeros(2, 48000)
    x[:, ::4800] = 0.5  # sparse clicks: very quiet in LUFS, loud in peak
    out = normalize(x, 48000, "lufs")
    assert "ceiling" in out.note
    assert abs(float(out.waveform.abs().max()) - 10 ** (-1 / 20)) < 1e-5


def test_short_clip_falls_back_to_peak():
    out = normalize(_noise(seconds=0.2), 48000, "lufs")
    assert "too short" in out.note
    assert abs(20 * np.log10(float(out.waveform.abs().max())) + 1.0) < 1e-4


def test_silence_and_bad_mode():
    z = torch.zeros(2, 48000)
    assert torch.equal(normalize(z, 48000, "lufs").waveform, z)
    with pytest.raises(ValueError, match="normalisation"):
        normalize(z, 48000, "rms")
