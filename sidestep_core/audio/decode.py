"""Decode any audio file FFmpeg reads into float32 stereo at 48 kHz.

PyAV decodes (wav, flac, mp3, ogg/vorbis, opus, m4a/aac, aiff, ...) in a worker process (``native.py``), which
also maps the channels to stereo (mono is duplicated, more than two are downmixed by their layout): a file that
crashes or hangs FFmpeg is skipped with a reason instead of ending the run. The band-limited resampler in
``resample.py`` changes the rate here. Nothing here needs torchaudio.
"""

from __future__ import annotations

import json
import math
import signal
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import native
from . import resample as rs
from .native import channel_names, downmix_matrix, to_stereo  # noqa: F401 (part of this module's API)

TARGET_RATE = 48000
HUGE_PEAK = 16.0  # float samples beyond +24 dBFS are not a hot master but a corrupt or unscaled file
MIN_RATE, MAX_RATE = 4000, 768000  # sample rates of real audio files
DECODE_TIMEOUT = 600.0  # seconds one file may take in the worker before it counts as hung


class AudioError(ValueError):
    """A file that cannot be used as training audio; the message starts with the path and says why."""


@dataclass
class DecodedAudio:
    waveform: torch.Tensor  # [2, S] float32 in [-1, 1] at ``sample_rate``
    sample_rate: int
    source_rate: int
    source_channels: int
    source_layout: str
    source_duration: float  # seconds the file holds (declared length when decoding stopped at max_duration)
    trimmed: bool  # True when max_duration cut the file
    codec: str = ""
    bit_rate: Optional[int] = None  # bits/s as the file declares it
    lossless: bool = True
    source_peak: float = 0.0  # largest |sample| before clamping (above 1 only for float sources)
    warnings: list[str] = field(default_factory=list)  # kept, but the user should know

    @property
    def duration(self) -> float:
        return self.waveform.shape[-1] / self.sample_rate


def _signal_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class DecodeWorker:
    """A decoder process (``native.py``) reused across files; a native crash or hang costs one file.

    The process is started on first use and restarted after a crash, so later files still decode.
    """

    def __init__(self, timeout: float = DECODE_TIMEOUT, command: Optional[list[str]] = None):
        self.timeout = timeout
        self.command = command or [sys.executable, "-u", native.__file__]  # tests give one that crashes
        self._proc: Optional[subprocess.Popen] = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidestep-decode")

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )
        return self._proc

    def _kill(self) -> Optional[int]:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        return proc.wait()

    def _read(self, proc: subprocess.Popen) -> Optional[tuple[dict, np.ndarray]]:
        line = proc.stdout.readline()
        if not line:
            return None
        header = json.loads(line)
        if not header.get("ok"):
            return header, np.zeros((2, 0), np.float32)
        data = np.empty(2 * header["samples"], dtype="<f4")
        view, got = memoryview(data).cast("B"), 0
        while got < len(view):
            n = proc.stdout.readinto(view[got:])
            if not n:
                return None
            got += n
        return header, data.reshape(2, -1)

    def raw(self, path: Path, max_seconds: Optional[float]) -> tuple[dict, np.ndarray]:
        """The worker's answer for ``path``; raises :class:`AudioError` when it crashed, hung or refused."""
        proc = self._start()
        try:
            proc.stdin.write((json.dumps({"path": str(path), "max_seconds": max_seconds}) + "\n").encode())
            proc.stdin.flush()
            answer = self._reader.submit(self._read, proc).result(timeout=self.timeout)
        except FuturesTimeout:
            self._kill()
            raise AudioError(f"{path}: decoding did not finish in {self.timeout:g} s (the decoder hung)") from None
        except (OSError, ValueError):
            answer = None
        if answer is None:
            code = self._kill()
            raise AudioError(f"{path}: the decoder crashed on this file ({_signal_text(code or 0)})")
        header, data = answer
        if not header.get("ok"):
            raise AudioError(f"{path}: {header.get('reason') or 'cannot be decoded'}")
        return header, data

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        self._reader.shutdown(wait=False)

    def __enter__(self) -> "DecodeWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_audio(
    path: str | Path,
    *,
    sample_rate: int = TARGET_RATE,
    max_duration: Optional[float] = None,
    worker: Optional[DecodeWorker] = None,
) -> DecodedAudio:
    """Decode ``path`` to stereo float32 at ``sample_rate``, keeping at most ``max_duration`` seconds.

    Decoding runs in ``worker`` (a fresh one when None) and stops once ``max_duration`` is reached, so a long
    file costs only what is kept. Raises :class:`AudioError` for files that are not regular, do not open, hold
    no audio, fail or crash the decoder, or hold NaN/Inf or absurd samples. A file that declares more than it
    holds, or float samples over full scale, is kept with a ``warnings`` entry.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise AudioError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise AudioError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    if worker is None:
        with DecodeWorker() as own:
            return decode_audio(path, sample_rate=sample_rate, max_duration=max_duration, worker=own)
    header, data = worker.raw(path, max_duration)
    rate, kept = int(header["rate"]), int(header["samples"])
    if not MIN_RATE <= rate <= MAX_RATE:  # a damaged header; nothing to resample from
        raise AudioError(f"{path}: sample rate {rate} Hz is outside {MIN_RATE}–{MAX_RATE} Hz")
    if header["nonfinite"]:
        raise AudioError(f"{path}: {header['nonfinite']} NaN/Inf samples (the file is corrupt)")
    peak = float(header["peak"])
    if peak > HUGE_PEAK:
        raise AudioError(f"{path}: samples up to {peak:.3g} times full scale (corrupt, or float audio not scaled "
                         "to ±1)")
    warnings = []
    if peak > 1.0:
        warnings.append(f"float samples up to {20 * math.log10(peak):+.1f} dB over full scale were clipped to ±1")
    declared = header.get("declared_samples")
    if header["complete"] and declared and declared - kept > max(rate // 10, declared // 50):
        warnings.append(f"holds {kept / rate:.1f} s of the {declared / rate:.1f} s it declares (truncated or damaged)")
    wave = torch.from_numpy(data)
    if rate != sample_rate:
        if rs.supported(rate, sample_rate):
            wave = rs.resample(wave, rate, sample_rate)
        else:
            wave = _swr_resample(wave, rate, sample_rate)
    total = kept if header["complete"] else (declared or kept)
    trimmed = False
    if max_duration is not None:
        max_samples = int(round(max_duration * sample_rate))
        if wave.shape[-1] > max_samples:
            wave = wave[:, :max_samples]
            trimmed = True
    # Lossy decoders overshoot full scale slightly; the VAE expects [-1, 1].
    wave = wave.clamp_(-1.0, 1.0).contiguous()
    codec = header.get("codec") or ""
    return DecodedAudio(
        waveform=wave,
        sample_rate=sample_rate,
        source_rate=rate,
        source_channels=len(header["names"]),
        source_layout=",".join(header["names"]),
        source_duration=total / rate,
        trimmed=trimmed,
        codec=codec,
        bit_rate=header.get("bit_rate"),
        lossless=codec.startswith(native.LOSSLESS_PREFIXES),
        source_peak=peak,
        warnings=warnings,
    )


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
