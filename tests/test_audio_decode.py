"""Audio decoding: every container/codec, channel layouts, 8–96 kHz, resampling quality and broken files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from preprocess_helpers import FORMATS, tone, write_audio, write_format
from sidestep_core.audio import decode as D
from sidestep_core.audio.resample import resample, supported


@pytest.mark.parametrize("name,codec,container,rate,channels", FORMATS, ids=[f[0] for f in FORMATS])
def test_every_format_decodes_to_stereo_48k(tmp_path, name, codec, container, rate, channels):
    path = write_format(tmp_path, name, codec, container, rate, channels, seconds=0.25)
    out = D.decode_audio(path)
    assert out.sample_rate == 48000 and out.source_rate == rate and out.source_channels == channels
    assert out.waveform.dtype == torch.float32 and out.waveform.shape[0] == 2
    # lossy codecs add priming/padding samples, so allow a few milliseconds either way
    assert abs(out.duration - 0.25) < 0.05, out.duration
    assert float(out.waveform.abs().max()) <= 1.0
    assert 0.2 < float(out.waveform.abs().max()) < 0.95
    if channels == 1:
        assert torch.equal(out.waveform[0], out.waveform[1])  # mono is duplicated


def test_lossless_decode_is_accurate_after_resampling(tmp_path):
    src = tone(0.5, 44100, 2, freq=440.0)
    path = write_audio(tmp_path / "x.flac", src, 44100, "flac")
    out = D.decode_audio(path).waveform
    n = out.shape[1]
    assert n == math.ceil(src.shape[1] * 48000 / 44100)
    t = np.arange(n) / 48000
    ref = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    err = np.abs(out[0].numpy() - ref)[2000:-2000].max()
    assert err < 2e-4  # 16-bit quantisation dominates


@pytest.mark.parametrize("orig", [8000, 11025, 16000, 22050, 32000, 44100, 88200, 96000])
def test_resampler_is_band_limited_and_accurate(orig):
    assert supported(orig, 48000)
    t = np.arange(orig // 2) / orig
    x = torch.from_numpy(np.sin(2 * np.pi * 1000.0 * t)).float()[None]
    y = resample(x, orig, 48000)
    assert y.shape[1] == math.ceil(x.shape[1] * 48000 / orig)
    ref = np.sin(2 * np.pi * 1000.0 * np.arange(y.shape[1]) / 48000)
    assert np.abs(y[0].numpy() - ref)[1500:-1500].max() < 1e-5
    if orig > 48000:  # a tone above the new Nyquist frequency must vanish, not alias
        hi = torch.from_numpy(np.sin(2 * np.pi * 30000.0 * t)).float()[None]
        assert resample(hi, orig, 48000)[0, 1500:-1500].abs().max() < 1e-4


def test_odd_rate_falls_back_to_swresample(tmp_path):
    rate = 44056  # no small integer ratio to 48 kHz
    assert not supported(rate, 48000)
    path = write_audio(tmp_path / "odd.wav", tone(0.3, rate, 2), rate)
    out = D.decode_audio(path)
    assert out.source_rate == rate and abs(out.duration - 0.3) < 0.01


def test_multichannel_downmix_by_layout():
    names = ["FL", "FR", "FC", "LFE", "BL", "BR"]
    m = D.downmix_matrix(names)
    assert m.shape == (2, 6)
    assert np.allclose(m.sum(axis=1), 1.0)  # never louder than the loudest input: no clipping
    assert m[0, 3] == m[1, 3] == 0.0  # LFE dropped
    assert m[0, 1] == 0.0 and m[1, 0] == 0.0 and m[0, 4] > 0 and m[1, 5] > 0
    assert m[0, 2] == m[1, 2] > 0  # centre to both sides
    # files that name no channels get the usual layout for their count
    assert D.channel_names(["NONE"] * 6) == names
    x = np.ones((6, 10), np.float32)
    assert np.allclose(D.to_stereo(x, names), 1.0)


def test_trimming_to_max_duration(tmp_path):
    path = write_audio(tmp_path / "long.wav", tone(1.0, 44100, 2), 44100)
    out = D.decode_audio(path, max_duration=0.4)
    assert out.trimmed and out.waveform.shape[1] == int(0.4 * 48000)
    assert abs(out.source_duration - 1.0) < 0.05  # the file's own length, for the "trimmed" message
    full = D.decode_audio(path, max_duration=5)
    assert not full.trimmed and abs(full.duration - 1.0) < 1e-3


def test_clipping_input_is_clamped(tmp_path):
    data = tone(0.2, 48000, 2, amp=1.0) * 1.5
    path = write_audio(tmp_path / "hot.wav", data, 48000, "pcm_f32le")
    out = D.decode_audio(path)
    assert float(out.waveform.abs().max()) == 1.0


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "empty file"),
        (b"this is not audio at all" * 50, "cannot be opened as audio|no audio stream|decoding failed"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "cannot be opened as audio|no audio samples|decoding failed"),
    ],
    ids=["empty", "garbage", "truncated-header"],
)
def test_broken_files_raise_with_a_reason(tmp_path, content, match):
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(D.AudioError, match=match) as info:
        D.decode_audio(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_peak_dbfs():
    assert D.peak_dbfs(torch.zeros(2, 10)) == float("-inf")
    assert abs(D.peak_dbfs(torch.full((2, 10), 0.5)) + 6.0206) < 1e-3
