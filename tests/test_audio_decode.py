"""Audio decoding: every container/codec, channel layouts, 8–96 kHz, resampling quality and broken files."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------------------
# hostile files: generated here, never committed
# ----------------------------------------------------------------------------------------------------------


def _pcm_wav(path, data: np.ndarray, rate: int):
    """[C, S] float in [-1, 1] as 16-bit PCM through the standard library (PyAV's own encoder cannot even
    build frames of 8+ planar channels)."""
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(data.T, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _float_wav(path, data: np.ndarray, rate: int):
    import soundfile

    soundfile.write(str(path), np.ascontiguousarray(data.T), rate, subtype="FLOAT")
    return path


@pytest.mark.parametrize("channels", [8, 10, 16, 24])
def test_many_channels_decode_instead_of_crashing(tmp_path, channels):
    data = tone(0.2, 48000, channels)
    out = D.decode_audio(_pcm_wav(tmp_path / f"c{channels}.wav", data, 48000))
    assert out.source_channels == channels and out.waveform.shape == (2, 9600)
    assert 0.05 < float(out.waveform.abs().max()) <= 1.0
    names = D.channel_names(["NONE"] * channels)
    expected = D.to_stereo(np.round(data * 32767) / 32767, names)
    assert np.allclose(out.waveform.numpy(), expected, atol=1e-4)


def test_a_crashing_decoder_costs_one_file_and_the_worker_restarts(tmp_path):
    """A real native crash (a NULL read) in the decoder process: the file fails with a reason, later files
    decode in a fresh worker."""
    good = write_audio(tmp_path / "good.wav", tone(0.1, 48000), 48000)
    crash = write_audio(tmp_path / "crash.wav", tone(0.1, 48000), 48000)
    script = tmp_path / "crashy_worker.py"
    script.write_text(
        "import ctypes, sys\n"
        f"sys.path.insert(0, {str(Path(D.native.__file__).parent)!r})\n"
        "import native\n"
        "real = native.decode\n"
        "def decode(path, max_seconds=None):\n"
        "    if path.endswith('crash.wav'):\n"
        "        ctypes.string_at(0)\n"
        "    return real(path, max_seconds)\n"
        "native.decode = decode\n"
        "native.serve(sys.stdin.buffer, sys.stdout.buffer)\n"
    )
    with D.DecodeWorker(command=[sys.executable, str(script)]) as worker:
        assert D.decode_audio(good, worker=worker).duration == pytest.approx(0.1, abs=1e-3)
        with pytest.raises(D.AudioError, match=r"crash.wav: the decoder crashed on this file \(signal SIGSEGV\)"):
            D.decode_audio(crash, worker=worker)
        assert D.decode_audio(good, worker=worker).duration == pytest.approx(0.1, abs=1e-3)


def test_a_hanging_decoder_is_stopped(tmp_path):
    good = write_audio(tmp_path / "good.wav", tone(0.1, 48000), 48000)
    script = tmp_path / "hang.py"
    script.write_text("import sys, time\nsys.stdin.readline()\ntime.sleep(60)\n")
    with D.DecodeWorker(timeout=1.0, command=[sys.executable, str(script)]) as worker:
        with pytest.raises(D.AudioError, match="did not finish in 1 s"):
            D.decode_audio(good, worker=worker)


@pytest.mark.parametrize("bad,match", [(float("nan"), "NaN/Inf samples"), (float("inf"), "NaN/Inf samples"),
                                       (1e30, "1e\\+30 times full scale")])
def test_corrupt_float_samples_are_refused(tmp_path, bad, match):
    data = tone(0.2, 48000)
    data[0, 100:110] = bad
    with pytest.raises(D.AudioError, match=match):
        D.decode_audio(_float_wav(tmp_path / "x.wav", data, 48000))


def test_float_samples_over_full_scale_are_kept_with_a_warning(tmp_path):
    out = D.decode_audio(_float_wav(tmp_path / "hot.wav", tone(0.2, 48000, amp=1.5), 48000))
    assert float(out.waveform.abs().max()) == 1.0
    assert out.warnings == ["float samples up to +3.5 dB over full scale were clipped to ±1"]


def test_truncated_mp3_is_kept_with_a_warning(tmp_path):
    full = write_audio(tmp_path / "full.mp3", tone(2.0, 44100), 44100, "libmp3lame")
    assert D.decode_audio(full).warnings == []
    half = tmp_path / "half.mp3"
    half.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    out = D.decode_audio(half)
    assert 0.8 < out.duration < 1.2
    assert len(out.warnings) == 1 and out.warnings[0].startswith("holds 1.0 s of the 2.0 s it declares")
    assert not out.lossless and out.bit_rate and out.bit_rate < 192_000


def test_special_files_are_refused_without_opening_them(tmp_path):
    os.mkfifo(tmp_path / "pipe.wav")
    with pytest.raises(D.AudioError, match="not a regular file"):
        D.decode_audio(tmp_path / "pipe.wav")  # opening it would wait for a writer forever
    with pytest.raises(D.AudioError, match="not a regular file"):
        D.decode_audio("/dev/zero")


def test_long_files_are_cut_while_decoding(tmp_path):
    """A 20-minute file with max_duration=30: only what is kept is decoded and sent, in bounded time."""
    import time

    rate, minutes = 8000, 20
    t = np.arange(rate * 60 * minutes, dtype=np.float32) / rate
    path = _pcm_wav(tmp_path / "long.wav", (0.3 * np.sin(2 * np.pi * 220 * t))[None], rate)
    start = time.perf_counter()
    out = D.decode_audio(path, max_duration=30)
    assert time.perf_counter() - start < 10
    assert out.trimmed and out.duration == 30 and out.source_duration == pytest.approx(60 * minutes, abs=0.01)


@pytest.mark.parametrize("rate", [1, 3000, 1_000_000])
def test_absurd_sample_rates_are_refused(tmp_path, rate):
    path = _pcm_wav(tmp_path / "r.wav", tone(0.05, 48000), 48000)
    raw = bytearray(path.read_bytes())
    raw[24:28] = rate.to_bytes(4, "little")  # the fmt chunk's sample rate
    raw[28:32] = (rate * 4).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(D.AudioError, match="sample rate"):
        D.decode_audio(path)
