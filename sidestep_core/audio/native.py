"""The native half of decoding: FFmpeg (PyAV) reads the file, channels are mixed to stereo, samples are checked.

This module runs in a separate worker process (``python native.py``, started by ``decode.DecodeWorker``), so a
file that crashes FFmpeg or PyAV costs that file, not the run. It imports only numpy and av — not the package —
so it starts fast and can be run by path from wherever the pack is installed.

Frames are converted to *packed* float32 (``flt``): PyAV's ``to_ndarray`` on planar audio with 8 or more
channels reads past its plane pointers and segfaults; a packed frame is one buffer, whatever the channel count.

Protocol (binary, over stdin/stdout): the parent writes one JSON line ``{"path", "max_seconds"}``; the worker
answers one JSON line (``{"ok": false, "reason"}`` or the header below) followed, when ok, by the stereo samples
as ``2 * samples`` little-endian float32 values, channel-major.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Optional

import numpy as np

# Channel names (FFmpeg's) that belong to the left / right side; centre-like ones go to both at -3 dB.
_LEFT = {"FL", "FLC", "SL", "BL", "TFL", "TBL", "TSL", "WL", "SDL", "LH", "TFLC", "BFL", "LSD"}
_RIGHT = {"FR", "FRC", "SR", "BR", "TFR", "TBR", "TSR", "WR", "SDR", "RH", "TFRC", "BFR", "RSD"}
_DROP = {"LFE", "LFE2", "LFE1"}  # sub-bass effects are not part of a stereo mix
_CENTRE_GAIN = 1 / math.sqrt(2)
# Layouts assumed for files that do not name their channels (e.g. plain WAV without a channel mask).
_DEFAULT_LAYOUTS = {3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
# Codecs whose samples are an approximation of the source (for the dataset report's bit-rate check).
LOSSLESS_PREFIXES = ("pcm_", "flac", "alac", "wavpack", "ape", "tta", "mlp", "truehd", "s302m")


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


class DecodeFailure(Exception):
    """A file that cannot be decoded; the message is the one-line reason (without the path)."""


def _short(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
    return str(text).splitlines()[0][:160]


def decode(path: str, max_seconds: Optional[float] = None) -> tuple[dict, np.ndarray]:
    """Decode ``path`` at its own rate to stereo float32 [2, S], keeping at most ``max_seconds`` (decoding stops
    there). Non-finite samples are counted and zeroed; the peak of the finite ones is reported, nothing is clamped
    here."""
    import av

    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise DecodeFailure(f"cannot be opened as audio ({_short(exc)})") from exc
    with container:
        if not container.streams.audio:
            raise DecodeFailure("no audio stream")
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        to_float = av.AudioResampler(format="flt")  # packed; keeps rate and layout
        chunks: list[np.ndarray] = []
        names: list[str] = []
        rate = kept = nonfinite = 0
        peak = 0.0
        limit: Optional[int] = None
        mix: Optional[np.ndarray] = None  # the down-mix, computed once for files with more than two channels

        def take(frames) -> bool:
            nonlocal kept, nonfinite, peak
            for out in frames:
                arr = out.to_ndarray().reshape(-1, len(names)).T  # packed [1, S*C] -> [C, S]
                part = arr if limit is None else arr[:, : limit - kept]
                part = np.array(part, dtype=np.float32)
                bad = ~np.isfinite(part)
                if bad.any():
                    nonfinite += int(bad.sum())
                    part[bad] = 0.0
                if part.size:
                    peak = max(peak, float(np.abs(part).max()))
                chunks.append(to_stereo(part, names) if mix is None else (mix @ part).astype(np.float32))
                kept += part.shape[1]
            return limit is None or kept < limit

        more = True
        try:
            for frame in container.decode(stream):
                if not rate:
                    rate = frame.sample_rate
                    names = [c.name for c in frame.layout.channels]
                    if len(names) > 2:
                        mix = downmix_matrix(channel_names(names)).astype(np.float32)
                    if max_seconds is not None:
                        # a little extra so the resampler's right edge sees real signal; trimmed after
                        limit = int(math.ceil(max_seconds * rate)) + 64
                elif len(frame.layout.channels) != len(names):
                    raise DecodeFailure("channel count changes mid-stream")
                if not take(to_float.resample(frame)):
                    more = False
                    break  # a long file is not read past what is kept
            if more and rate:
                take(to_float.resample(None))  # flush
        except DecodeFailure:
            raise
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            raise DecodeFailure(f"decoding failed ({_short(exc)})") from exc
        declared = _declared_samples(container, stream, rate) if rate else None
        header = {
            "ok": True,
            "rate": rate,
            "names": names,
            "samples": kept,
            "complete": more,
            "declared_samples": declared,
            "nonfinite": nonfinite,
            "peak": peak,
            "codec": ctx.name or "",
            "sample_format": ctx.format.name if ctx.format is not None else "",
            "bit_rate": int(ctx.bit_rate or stream.bit_rate or container.bit_rate or 0) or None,
        }
    if not chunks or kept == 0:
        raise DecodeFailure("no audio samples (empty stream)")
    return header, np.ascontiguousarray(np.concatenate(chunks, axis=1), dtype="<f4")


def _declared_samples(container, stream, rate: int) -> Optional[int]:
    """The length the file declares (stream, then container duration)."""
    if stream.duration is not None and stream.time_base is not None:
        return int(stream.duration * stream.time_base * rate)
    if container.duration is not None:
        return int(container.duration / 1_000_000 * rate)  # AV_TIME_BASE units
    return None


def serve(inp, out) -> None:
    """Answer decode requests until stdin closes."""
    for line in inp:
        request = json.loads(line)
        try:
            header, data = decode(request["path"], request.get("max_seconds"))
        except DecodeFailure as exc:
            out.write((json.dumps({"ok": False, "reason": str(exc)}) + "\n").encode())
        except MemoryError:
            out.write(b'{"ok": false, "reason": "too large to decode in memory"}\n')
        except Exception as exc:  # anything else PyAV raises for a hostile file is still that file's problem
            reason = f"decoding failed ({type(exc).__name__}: {_short(exc)})"
            out.write((json.dumps({"ok": False, "reason": reason}) + "\n").encode())
        else:
            out.write((json.dumps(header) + "\n").encode())
            out.write(memoryview(data).cast("B"))
        out.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
