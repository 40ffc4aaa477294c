"""The dataset quality report: what in a set of songs is likely to hurt an adapter, found while preprocessing.

Per file, :func:`measure` takes a few numbers from the decoded audio (peak, clipped share, loudness, a coarse
spectral fingerprint, a hash of the decoded samples). Over the set, :func:`report` turns them and the metadata into
warnings — clipping, lossy sources under 192 kbit/s, a wide loudness spread, mixed sample rates, exact and near
duplicates, clips short or long for the training crop, songs without caption or lyrics, too few songs. Nothing
here refuses a file: the user reads the report and decides.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Optional

import torch

from ..audio.decode import DecodedAudio
from ..audio.loudness import measure_lufs

LOSSY_MIN_BITRATE = 192_000  # bits/s; below it lossy codecs smear the highs the VAE learns from
CLIP_LEVEL = 0.999  # |x| at or above: a clipped sample when its neighbour is too
CLIP_SHARE = 1e-4  # share of clipped samples above which a file counts as clipping
LOUDNESS_SPREAD_LU = 6.0  # integrated loudness range across the set that deserves a word
NEAR_DUPLICATE = 0.97  # fingerprint correlation
DURATION_TOLERANCE = 0.05  # near duplicates also have lengths within 5 %
DEFAULT_CROP_SECONDS = 60.0  # TrainConfig.crop_seconds' default
MIN_SONGS = 8  # fewer distinct songs than this rarely make an adapter that generalises
_BANDS, _SEGMENTS = 8, 16  # fingerprint: log band energies over equal time segments
_FLOOR_DB = 60.0  # bands this far under the loudest count as empty (codecs differ in what they leave there)
_EXCERPTS, _EXCERPT_SECONDS = 10, 10  # loudness of long clips: ten 10 s excerpts


def _fingerprint(wave: torch.Tensor, rate: int) -> Optional[list[float]]:
    """Log energy in 8 octave-ish bands × 16 time segments, standardised; None for clips too short to tell."""
    mono = wave.mean(0)
    n_fft = 2048
    hop = max(n_fft // 2, mono.numel() // (_SEGMENTS * 64))  # at most ~1000 frames, whatever the length
    if mono.numel() < n_fft + hop * _SEGMENTS:
        return None
    spec = torch.stft(mono, n_fft, hop_length=hop, window=torch.hann_window(n_fft), center=False,
                      return_complex=True)
    power = spec.abs().square()  # [bins, frames]
    edges = [0] + [int(n_fft / 2 * 2 ** (k - _BANDS)) for k in range(1, _BANDS)] + [power.shape[0]]
    bands = torch.stack([power[a:max(b, a + 1)].sum(0) for a, b in zip(edges[:-1], edges[1:])])  # [8, frames]
    segs = torch.stack([c.mean(1) for c in torch.tensor_split(bands, _SEGMENTS, dim=1)], 1)  # [8, 16]
    db = 10 * torch.log10(segs.clamp_min(1e-20))
    db = db.clamp_min(float(db.max()) - _FLOOR_DB)
    db = db - db.mean()
    std = float(db.std())
    if std < 1e-6:
        return None
    return [round(float(v), 3) for v in (db / std).flatten()]


def _loudness(wave: torch.Tensor, rate: int) -> Optional[float]:
    """Integrated loudness; of evenly spaced excerpts for long clips, so a 10-minute song costs what 100 s do
    (gating over excerpts of music lands within a fraction of an LU of the whole, plenty for a spread check)."""
    total, part = wave.shape[-1], _EXCERPT_SECONDS * rate
    if total > _EXCERPTS * part:
        starts = torch.linspace(0, total - part, _EXCERPTS).long().tolist()
        wave = torch.cat([wave[:, a:a + part] for a in starts], dim=-1)
    return measure_lufs(wave, rate)


def measure(decoded: DecodedAudio) -> dict[str, Any]:
    """The per-file numbers the report needs, from the decoded (trimmed, clamped, un-normalised) audio."""
    wave, rate = decoded.waveform, decoded.sample_rate
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    clipped = 0
    if peak >= CLIP_LEVEL and wave.shape[-1] > 1:
        hot = wave.abs() >= CLIP_LEVEL
        clipped = int((hot[:, 1:] & hot[:, :-1]).sum())
    return {
        "peak_dbfs": round(20 * math.log10(peak), 2) if peak > 0 else None,
        "clipped_share": clipped / max(1, wave.numel()),
        "lufs": _round(_loudness(wave, rate)),
        "codec": decoded.codec,
        "bit_rate": decoded.bit_rate,
        "lossless": decoded.lossless,
        "content_sha256": hashlib.sha256(wave.contiguous().numpy().tobytes()).hexdigest(),
        "fingerprint": _fingerprint(wave, rate),
    }


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 2)


def _similar(a: list[float], b: list[float]) -> float:
    ta, tb = torch.tensor(a), torch.tensor(b)
    return float((ta * tb).mean())  # both standardised: the mean product is their correlation


def _warn(check: str, message: str, files: list[str]) -> dict:
    return {"check": check, "message": message, "files": files}


def _names(files: list[str], limit: int = 6) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def report(samples: list[dict], *, crop_seconds: float = DEFAULT_CROP_SECONDS) -> dict[str, Any]:
    """Warnings over the manifest's sample records (``quality`` holds each file's :func:`measure`)."""
    warnings: list[dict] = []
    by_audio: dict[str, dict] = {}
    for s in samples:  # one entry per audio file (a JSON may list a file twice)
        by_audio.setdefault(s.get("audio", s.get("id", "")), s)
    songs = list(by_audio.values())
    measured = [s for s in songs if isinstance(s.get("quality"), dict)]

    def q(s: dict, key: str):
        return s["quality"].get(key)

    clipping = [s["audio"] for s in measured if (q(s, "clipped_share") or 0) > CLIP_SHARE]
    if clipping:
        warnings.append(_warn("clipping", f"{len(clipping)} file(s) clip (flat tops at full scale): "
                                          f"{_names(clipping)}", clipping))
    lossy = [s for s in measured if not q(s, "lossless") and q(s, "bit_rate") and q(s, "bit_rate") < LOSSY_MIN_BITRATE]
    if lossy:
        text = ", ".join(f"{s['audio']} ({q(s, 'codec')} {q(s, 'bit_rate') // 1000} kbit/s)" for s in lossy[:6])
        warnings.append(_warn("lossy", f"{len(lossy)} lossy file(s) under {LOSSY_MIN_BITRATE // 1000} kbit/s: {text}"
                                       f"{' …' if len(lossy) > 6 else ''}; the adapter learns their artefacts",
                              [s["audio"] for s in lossy]))
    loud = [(q(s, "lufs"), s["audio"]) for s in measured if q(s, "lufs") is not None]
    if len(loud) > 1:
        (lo, quiet), (hi, loudest) = min(loud), max(loud)
        if hi - lo > LOUDNESS_SPREAD_LU:
            warnings.append(_warn("loudness", f"loudness spreads over {hi - lo:.1f} LU ({quiet} {lo:.1f} LUFS … "
                                              f"{loudest} {hi:.1f} LUFS); consider --normalize lufs",
                                  [quiet, loudest]))
    rates: dict[int, int] = {}
    for s in songs:
        if s.get("source_sample_rate"):
            rates[s["source_sample_rate"]] = rates.get(s["source_sample_rate"], 0) + 1
    if len(rates) > 1:
        text = ", ".join(f"{n} at {r / 1000:g} kHz" for r, n in sorted(rates.items(), key=lambda kv: -kv[1]))
        warnings.append(_warn("sample_rates", f"mixed sample rates ({text}); low-rate files lack the highs", []))
    duplicates, redundant = _duplicates(songs)
    warnings += duplicates
    short = [s["audio"] for s in songs if s.get("duration", 0) < crop_seconds / 2]
    if short:
        warnings.append(_warn("short", f"{len(short)} clip(s) shorter than half the {crop_seconds:g} s training "
                                       f"crop: {_names(short)}", short))
    long = [s["audio"] for s in songs if s.get("trimmed") or s.get("duration", 0) > 5 * crop_seconds]
    if long:
        warnings.append(_warn("long", f"{len(long)} clip(s) trimmed or over {5 * crop_seconds:g} s: each training "
                                      f"step sees a random {crop_seconds:g} s of them: {_names(long)}", long))
    no_caption = [s["audio"] for s in songs if not s.get("raw_caption") and not s.get("genre")]
    if no_caption:
        warnings.append(_warn("no_caption", f"{len(no_caption)} song(s) without a caption (a sidecar or dataset "
                                            f"JSON describes them): {_names(no_caption)}", no_caption))
    no_lyrics = [s["audio"] for s in songs if s.get("is_instrumental") and not s.get("declared_instrumental")]
    if no_lyrics:
        warnings.append(_warn("no_lyrics", f"{len(no_lyrics)} song(s) without lyrics, trained as instrumental: "
                                           f"{_names(no_lyrics)}", no_lyrics))
    distinct = len(songs) - redundant
    if distinct < MIN_SONGS:
        count = f"{len(songs)} files, {distinct} distinct songs" if redundant else f"{len(songs)} song(s)"
        warnings.append(_warn("few_songs", f"{count}; fewer than {MIN_SONGS} songs rarely teach a style without "
                                           "copying them", []))
    return {
        "songs": len(songs),
        "measured": len(measured),
        "total_seconds": round(sum(s.get("duration", 0.0) for s in songs), 1),
        "warnings": warnings,
    }


def _duplicates(songs: list[dict]) -> tuple[list[dict], int]:
    """Warnings for files with the same content, and how many files repeat an earlier one."""
    out = []
    groups: dict[str, list[dict]] = {}
    for s in songs:  # the same decoded samples (a WAV and its FLAC) or, unmeasured, the same bytes
        content = s["quality"].get("content_sha256") if isinstance(s.get("quality"), dict) else None
        groups.setdefault(content or s.get("audio_sha256") or s["audio"], []).append(s)
    redundant = 0
    for g in groups.values():
        if len(g) > 1:
            out.append(_warn("exact_duplicate", f"same audio: {', '.join(s['audio'] for s in g)}",
                             [s["audio"] for s in g]))
            redundant += len(g) - 1
    firsts = [g[0] for g in groups.values()
              if isinstance(g[0].get("quality"), dict) and g[0]["quality"].get("fingerprint")]
    matched: set[str] = set()
    for i, a in enumerate(firsts):
        for b in firsts[i + 1:]:
            da, db = a.get("duration", 0.0), b.get("duration", 0.0)
            if abs(da - db) > DURATION_TOLERANCE * max(da, db):
                continue
            sim = _similar(a["quality"]["fingerprint"], b["quality"]["fingerprint"])
            if sim >= NEAR_DUPLICATE:
                out.append(_warn("near_duplicate", f"probably the same song ({sim:.2f} alike): {a['audio']}, "
                                                   f"{b['audio']}", [a["audio"], b["audio"]]))
                matched.add(b["audio"])
    return out, redundant + len(matched)


def report_lines(rep: dict) -> list[str]:
    """The report as text lines (CLI and node)."""
    head = f"dataset report: {rep['songs']} song(s), {rep['total_seconds'] / 60:.1f} min"
    if not rep["warnings"]:
        return [head + ": nothing to note"]
    return [head + f", {len(rep['warnings'])} warning(s):"] + [f"  - {w['message']}" for w in rep["warnings"]]
