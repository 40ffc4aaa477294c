"""Decode any audio file FFmpeg reads into float32 stereo at 48 kHz.

PyAV decodes (wav, flac, mp3, ogg/vorbis, opus, m4a/aac, aiff, ...); channels are mapped to stereo here (mono is
duplicated, more than two are downmixed by their layout); the band-limited resampler in ``resample.py`` changes
the rate. Nothing here needs torchaudio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import resample as rs

TARGET_RATE = 48000
# Channel names (FFmpeg's) that belong to the left / right side; centre-like ones go to both at -3 dB.
_LEFT = {"FL", "FLC", "SL", "BL", "TFL", "TBL", "TSL", "WL", "SDL", "LH", "TFLC", "BFL", "LSD"}
_RIGHT = {"FR", "FRC", "SR", "BR", "TFR", "TBR", "TSR", "WR", "SDR", "RH", "TFRC", "BFR", "RSD"}
_DROP = {"LFE", "LFE2", "LFE1"}  # sub-bass effects are not part of a stereo mix
_CENTRE_GAIN = 1 / math.sqrt(2)


class AudioError(ValueError):
    """A file that cannot be used as training audio; the message starts with the path and says why."""


@dataclass
class DecodedAudio:
    waveform: torch.Tensor  # [2, S] float32 in [-1, 1] at ``sample_rate``
    sample_rate: int
    source_rate: int
    source_channels: int
    source_layout: str
    source_duration: float  # seconds decoded before trimming
    trimmed: bool  # True when max_duration cut the file

    @property
    def duration(self) -> float:
        return self.waveform.shape[-1] / self.sample_rate


def downmix_matrix(names: list[str]) -> np.ndarray:
    """[2, C] weights mapping named channels to stereo; each row is normalised to sum 1, so nothing clips.

    Left-side channels feed the left output, right-side the right, centre and unknown channels both at -3 dB,
    LFE is dropped. Unnamed layouts (all unknown) therefore become an equal-power average.
    """
    m = np.zeros((2, len(names)), dtype=np.float64)
    for i, name in enumerate(names):
        if name in _LEFT:
            m[0, i] = 1.0
        elif name in _RIGHT:
            m[1, i] = 1.0
        elif name not in _DROP:
            m[:, i] = _CENTRE_GAIN
    for row in m:
        total = row.sum()
        if total > 0:
            row /= total
    if not m.any():  # only LFE channels: keep something rather than nothing
        m[:] = 1.0 / len(names)
    return m


# Layouts assumed for files that do not name their channels (e.g. plain WAV without a channel mask).
_DEFAULT_LAYOUTS = {3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def channel_names(names: list[str]) -> list[str]:
    """The file's channel names, or the usual layout for its channel count when it names none."""
    known = _LEFT | _RIGHT | _DROP | {"FC", "BC", "TC", "TFC", "TBC", "LFE"}
    if len(names) > 2 and not any(n in known for n in names):
        import av

        layout = _DEFAULT_LAYOUTS.get(len(names))
        if layout:
            return [c.name for c in av.AudioLayout(layout).channels]
        return ["FL", "FR"] + ["FC"] * (len(names) - 2)
    return names


def to_stereo(x: np.ndarray, names: list[str]) -> np.ndarray:
    """[C, S] -> [2, S]: mono duplicated, stereo kept, more channels downmixed by layout."""
    if x.shape[0] == 1:
        return np.concatenate([x, x], axis=0)
    if x.shape[0] == 2:
        return x
    return (downmix_matrix(channel_names(names)) @ x.astype(np.float64)).astype(np.float32)


def _open(path: Path):
    import av

    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise AudioError(f"{path}: cannot be opened as audio ({_short(exc)})") from exc


def _short(exc: Exception) -> str:
    """One line without the file name (the message already starts with it)."""
    text = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
    return str(text).splitlines()[0][:160]


def decode_audio(
    path: str | Path, *, sample_rate: int = TARGET_RATE, max_duration: Optional[float] = None
) -> DecodedAudio:
    """Decode ``path`` to stereo float32 at ``sample_rate``, keeping at most ``max_duration`` seconds.

    Raises :class:`AudioError` for files that do not open, hold no audio stream or fail to decode.
    """
    import av

    path = Path(path)
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    container = _open(path)
    with container:
        if not container.streams.audio:
            raise AudioError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        to_float = av.AudioResampler(format="fltp")  # sample format only; keeps rate and layout
        chunks: list[np.ndarray] = []
        names: list[str] = []
        rate = 0
        kept = 0
        limit: Optional[int] = None

        def take(frames) -> bool:
            """Keep decoded samples up to the limit; False once it is reached."""
            nonlocal kept
            for out in frames:
                arr = out.to_ndarray()
                if arr.shape[0] != len(names):
                    raise AudioError(f"{path}: channel count changes mid-stream")
                part = arr if limit is None else arr[:, : limit - kept]
                chunks.append(np.ascontiguousarray(part, dtype=np.float32))
                kept += part.shape[1]
            return limit is None or kept < limit

        try:
            more = True
            for frame in container.decode(stream):
                if not rate:
                    rate = frame.sample_rate
                    names = [c.name for c in frame.layout.channels]
                    if max_duration is not None:
                        # a little extra so the resampler's right edge sees real signal; trimmed after
                        limit = int(math.ceil(max_duration * rate)) + 64
                if not take(to_float.resample(frame)):
                    more = False
                    break  # stop decoding: a long file is not read past what is kept
            if more and rate:
                take(to_float.resample(None))  # flush
        except AudioError:
            raise
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            raise AudioError(f"{path}: decoding failed ({_short(exc)})") from exc
        total = kept if more else _declared_samples(container, stream, rate) or kept
    if not chunks or kept == 0:
        raise AudioError(f"{path}: no audio samples (empty stream)")
    data = np.concatenate(chunks, axis=1)
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=1.0, neginf=-1.0)
    stereo = to_stereo(data, names)
    wave = torch.from_numpy(np.ascontiguousarray(stereo))
    if rate != sample_rate:
        if rs.supported(rate, sample_rate):
            wave = rs.resample(wave, rate, sample_rate)
        else:
            wave = _swr_resample(wave, rate, sample_rate)
    source_duration = total / rate
    trimmed = False
    if max_duration is not None:
        max_samples = int(round(max_duration * sample_rate))
        if wave.shape[-1] > max_samples:
            wave = wave[:, :max_samples]
            trimmed = True
    # Lossy decoders overshoot full scale slightly; the VAE expects [-1, 1].
    wave = wave.clamp_(-1.0, 1.0).contiguous()
    return DecodedAudio(
        waveform=wave,
        sample_rate=sample_rate,
        source_rate=rate,
        source_channels=len(names),
        source_layout=",".join(names),
        source_duration=source_duration,
        trimmed=trimmed,
    )


def _declared_samples(container, stream, rate: int) -> Optional[int]:
    """The length the file declares (stream, then container duration), for reporting what was trimmed."""
    if stream.duration is not None and stream.time_base is not None:
        return int(stream.duration * stream.time_base * rate)
    if container.duration is not None:
        return int(container.duration / 1_000_000 * rate)  # AV_TIME_BASE units
    return None


def _swr_resample(wave: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """FFmpeg's swresample, for rates whose ratio has no small integer form (e.g. 44056 Hz)."""
    import av

    resampler = av.AudioResampler(format="fltp", layout="stereo", rate=new)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave.numpy()), format="fltp", layout="stereo")
    frame.sample_rate = orig
    parts = [f.to_ndarray() for f in resampler.resample(frame)]
    parts += [f.to_ndarray() for f in resampler.resample(None)]
    out = np.concatenate(parts, axis=1) if parts else np.zeros((2, 0), np.float32)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def peak_dbfs(wave: torch.Tensor) -> float:
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    return 20 * math.log10(peak) if peak > 0 else float("-inf")
