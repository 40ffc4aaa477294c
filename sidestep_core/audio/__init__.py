"""Audio input: decoding (PyAV), channel mapping, resampling to 48 kHz and loudness normalisation."""

from .decode import AudioError, DecodedAudio, decode_audio
from .loudness import normalize

__all__ = ["AudioError", "DecodedAudio", "decode_audio", "normalize"]
