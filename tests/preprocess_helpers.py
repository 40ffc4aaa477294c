"""Shared helpers for the preprocessing tests: tiny checkpoints (made once per session), audio files written
with PyAV, and a narrow Oobleck VAE for fast tiling tests. Not a test module itself."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

_ROOT: Optional[Path] = None
_CHECKPOINTS: dict[str, object] = {}


def _session_root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="sidestep-preprocess-tests-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def tiny_checkpoint(layout: str = "original"):
    """A ``TinyCheckpoint`` of the ``tiny`` profile, seed 0, written once per test session."""
    if layout not in _CHECKPOINTS:
        from sidestep_core.tiny import make_tiny_checkpoint

        _CHECKPOINTS[layout] = make_tiny_checkpoint(_session_root() / f"tiny-{layout}", layout, "tiny", 0)
    return _CHECKPOINTS[layout]


def comfyui_dir() -> Optional[Path]:
    """A ComfyUI source tree to compare against: $COMFYUI_DIR, else the reference checkout if present."""
    for cand in (os.environ.get("COMFYUI_DIR"), "/work/ext/ComfyUI"):
        if cand and (Path(cand) / "comfy").is_dir():
            return Path(cand)
    return None


LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def tone(seconds: float, rate: int, channels: int = 2, freq: float = 330.0, amp: float = 0.5) -> np.ndarray:
    """[C, S] float32 sines, a different pitch per channel."""
    n = max(1, int(round(seconds * rate)))
    t = np.arange(n) / rate
    return np.stack([amp * np.sin(2 * np.pi * (freq + 55 * c) * t) for c in range(channels)]).astype(np.float32)


def write_audio(
    path: Path,
    data: np.ndarray,
    rate: int,
    codec: str = "pcm_s16le",
    container: Optional[str] = None,
    options: Optional[dict] = None,
) -> Path:
    """Encode [C, S] float audio with PyAV (it converts to the codec's sample format and frame size)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = LAYOUTS[data.shape[0]]
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout, options=options or {})
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data, dtype=np.float32), format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


# (file name, codec, container, rate, channels): one file per format the preprocessing must read
FORMATS = [
    ("pcm.wav", "pcm_s16le", None, 44100, 2),
    ("lossless.flac", "flac", None, 22050, 2),
    ("lossy.mp3", "libmp3lame", None, 32000, 1),
    ("vorbis.ogg", "vorbis", None, 44100, 2),
    ("voice.opus", "libopus", None, 48000, 2),
    ("aac.m4a", "aac", "ipod", 96000, 2),
    ("apple.aiff", "pcm_s16be", None, 11025, 1),
    ("surround.wav", "pcm_s24le", None, 48000, 6),
    ("phone.wav", "pcm_s16le", None, 8000, 1),
]
CODEC_OPTIONS = {"vorbis": {"strict": "experimental"}}


def write_format(folder: Path, name: str, codec: str, container, rate: int, channels: int, seconds: float) -> Path:
    # An odd sample count on purpose: nothing may assume whole frames or even lengths.
    data = tone(seconds, rate, channels)[:, :-3] if rate * seconds > 8 else tone(seconds, rate, channels)
    return write_audio(folder / name, data, rate, codec, container, CODEC_OPTIONS.get(codec))


def small_vae(seed: int = 0, latent: int = 8):
    """A narrow ``AutoencoderOobleck`` (16 channels) with the real 48 kHz / hop-1920 geometry: fast on CPU."""
    from diffusers import AutoencoderOobleck

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        vae = AutoencoderOobleck(
            encoder_hidden_size=2 * latent,
            downsampling_ratios=[2, 4, 4, 6, 10],
            channel_multiples=[1, 1, 1, 1, 1],
            decoder_channels=2 * latent,
            decoder_input_channels=latent,
            audio_channels=2,
            sampling_rate=48000,
        )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("weight_g"):
                p.copy_(0.5 + 0.05 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5)
    return vae.eval().requires_grad_(False)
