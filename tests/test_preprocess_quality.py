"""The dataset quality report: each check on generated audio, decoded as preprocessing decodes it (no model)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from preprocess_helpers import write_audio
from sidestep_core.audio.decode import DecodeWorker, decode_audio
from sidestep_core.data import quality as Q
from sidestep_core.data.cache import file_sha256


def _song(seconds: float, rate: int, seed: int, amp: float = 0.5) -> np.ndarray:
    """A few notes with an envelope: enough structure for a fingerprint to tell songs apart."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    notes = rng.uniform(110, 2000, size=8)
    out = np.zeros_like(t)
    seg = len(t) // len(notes)
    for i, f in enumerate(notes):
        part = slice(i * seg, (i + 1) * seg)
        out[part] = np.sin(2 * np.pi * f * t[part]) * np.hanning(seg)[: len(t[part])]
    out += 0.2 * np.sin(2 * np.pi * rng.uniform(3000, 8000) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.3 * t))
    out = amp * out / np.abs(out).max()
    return np.stack([out, np.roll(out, 7)]).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def _worker():
    global WORKER
    with DecodeWorker() as WORKER:
        yield


def _record(path, root, **meta):
    decoded = decode_audio(path, max_duration=600, worker=WORKER)
    return {
        "audio": path.relative_to(root).as_posix(),
        "duration": decoded.duration,
        "trimmed": decoded.trimmed,
        "source_sample_rate": decoded.source_rate,
        "audio_sha256": file_sha256(path),
        "raw_caption": meta.get("caption", "a caption"),
        "genre": "",
        "is_instrumental": meta.get("instrumental", False),
        "declared_instrumental": meta.get("declared", False),
        "quality": Q.measure(decoded),
    }


def _checks(rep):
    return {w["check"]: w for w in rep["warnings"]}


def test_a_clean_set_has_nothing_to_note(tmp_path):
    records = [_record(write_audio(tmp_path / f"s{i}.flac", _song(20, 48000, i), 48000, "flac"), tmp_path)
               for i in range(Q.MIN_SONGS)]
    rep = Q.report(records, crop_seconds=30)
    assert rep["warnings"] == [] and rep["songs"] == Q.MIN_SONGS
    assert Q.report_lines(rep) == [f"dataset report: {Q.MIN_SONGS} song(s), 2.7 min: nothing to note"]


def test_every_check_fires_on_the_file_that_deserves_it(tmp_path):
    base = _song(20, 44100, 1)
    files = {
        "orig.wav": write_audio(tmp_path / "orig.wav", base, 44100),
        # the same song re-encoded and 6 dB quieter: the same content, not the same bytes or samples
        "reencoded.mp3": write_audio(tmp_path / "reencoded.mp3", base * 0.5, 44100, "libmp3lame",
                                     options={"b": "128k"}),
        "flac_copy.flac": write_audio(tmp_path / "flac_copy.flac", base, 44100, "flac"),  # same samples
        "other.wav": write_audio(tmp_path / "other.wav", _song(20, 48000, 2), 48000),
        "clipped.wav": write_audio(tmp_path / "clipped.wav", np.clip(_song(20, 48000, 3, amp=2.0), -1, 1), 48000),
        "quiet.wav": write_audio(tmp_path / "quiet.wav", _song(20, 48000, 4, amp=0.02), 48000),
        "short.wav": write_audio(tmp_path / "short.wav", _song(5, 48000, 5), 48000),
    }
    shutil.copy(files["other.wav"], tmp_path / "other_copy.wav")  # same bytes
    files["other_copy.wav"] = tmp_path / "other_copy.wav"
    records = [_record(p, tmp_path, caption="" if name == "short.wav" else "x",
                       instrumental=name == "quiet.wav") for name, p in files.items()]
    rep = Q.report(records, crop_seconds=30)
    checks = _checks(rep)
    assert checks["clipping"]["files"] == ["clipped.wav"]
    assert checks["lossy"]["files"] == ["reencoded.mp3"] and "128 kbit/s" in checks["lossy"]["message"]
    assert set(checks["loudness"]["files"]) == {"quiet.wav", "clipped.wav"}
    assert checks["sample_rates"]["message"].startswith("mixed sample rates (5 at 48 kHz, 3 at 44.1 kHz)")
    exact = [set(w["files"]) for w in rep["warnings"] if w["check"] == "exact_duplicate"]
    assert {"other.wav", "other_copy.wav"} in exact and {"orig.wav", "flac_copy.flac"} in exact
    near = [set(w["files"]) for w in rep["warnings"] if w["check"] == "near_duplicate"]
    assert near == [{"orig.wav", "reencoded.mp3"}]
    assert checks["short"]["files"] == ["short.wav"]
    assert checks["no_caption"]["files"] == ["short.wav"]
    assert checks["no_lyrics"]["files"] == ["quiet.wav"]
    assert checks["few_songs"]["message"].startswith("8 files, 5 distinct songs; fewer than 8")
    text = "\n".join(Q.report_lines(rep))
    assert text.startswith("dataset report: 8 song(s)") and "probably the same song" in text


def test_different_songs_of_one_length_are_not_near_duplicates(tmp_path):
    records = [_record(write_audio(tmp_path / f"s{i}.wav", _song(20, 48000, 10 + i), 48000), tmp_path)
               for i in range(8)]
    assert not [w for w in Q.report(records, crop_seconds=30)["warnings"] if "duplicate" in w["check"]]


def test_long_and_trimmed_clips_and_few_songs(tmp_path):
    recs = [{"audio": "a.wav", "duration": 600.0, "trimmed": True}, {"audio": "b.wav", "duration": 301.0},
            {"audio": "c.wav", "duration": 90.0}]
    checks = _checks(Q.report(recs, crop_seconds=60))
    assert checks["long"]["files"] == ["a.wav", "b.wav"]
    assert checks["few_songs"]["message"].startswith("3 song(s); fewer than 8 songs")
    assert Q.report(recs)["measured"] == 0  # records of an older cache without measurements are still reported


def test_loudness_of_long_clips_is_estimated_from_excerpts():
    import torch

    from sidestep_core.audio.loudness import measure_lufs

    rate = 16000
    t = torch.arange(rate * 150) / rate
    wave = torch.stack([torch.sin(2 * np.pi * 440 * t) * (0.05 + 0.5 * torch.sin(2 * np.pi * t / 37).abs())] * 2)
    assert abs(Q._loudness(wave, rate) - measure_lufs(wave, rate)) < 1.0
