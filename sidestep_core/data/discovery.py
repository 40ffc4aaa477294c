"""Which audio files make up the dataset, and the metadata each one gets.

Without a dataset JSON every audio file under the folder (recursively) is a sample, described by its sidecars or
by defaults. With one, the JSON's samples are the dataset; their paths must resolve inside the dataset folder
unless the user allows outside paths (a JSON from elsewhere must not make us read arbitrary files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .metadata import DatasetSettings, MetadataError, SampleMeta, json_entry_meta, load_dataset_json, read_sidecars

AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aif", ".aiff", ".aifc"}
)


@dataclass
class Failure:
    path: str  # relative to the dataset folder where possible
    reason: str  # one line
    key: Optional[str] = None  # content key, when the failure happened while encoding (re-used while unchanged)

    def to_dict(self) -> dict:
        out = {"path": self.path, "reason": self.reason}
        if self.key:
            out["key"] = self.key
        return out


@dataclass
class Item:
    """One sample to preprocess."""

    id: str  # unique within the dataset: the relative path (plus #n for repeated JSON entries)
    path: Path  # the audio file
    rel: str  # audio path relative to the dataset folder (absolute when outside it)
    meta: SampleMeta


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def relpath(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _relative_message(exc: Exception, root: Path) -> str:
    """An error message whose leading absolute path is shortened to the path inside the dataset folder."""
    text = str(exc)
    head, sep, rest = text.partition(": ")
    if sep and Path(head).is_absolute():
        return f"{relpath(Path(head), root)}: {rest}"
    return text


def discover_audio(root: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """Audio files under ``root`` (recursive, sorted), skipping hidden entries and the ``exclude`` folders."""
    skip = {p.resolve() for p in exclude}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in skip)
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in AUDIO_EXTENSIONS:
                found.append(here / name)
    return found


def _from_folder(audio_dir: Path, exclude: Iterable[Path]) -> tuple[list[Item], list[Failure]]:
    items, failures = [], []
    for path in discover_audio(audio_dir, exclude):
        rel = relpath(path, audio_dir)
        try:
            meta = read_sidecars(path) or SampleMeta()
        except MetadataError as exc:
            failures.append(Failure(rel, f"unreadable metadata: {_relative_message(exc, audio_dir)}"))
            continue
        items.append(Item(rel, path, rel, meta))
    return items, failures


def _locate(entry: dict, audio_dir: Path, json_dir: Path, by_name: dict[str, list[Path]]) -> Optional[Path]:
    """The audio file of a JSON entry: ``audio_path`` (absolute, or relative to the JSON or the folder), then
    ``filename`` (relative, or a unique file name anywhere in the folder)."""
    for key in ("audio_path", "filename"):
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip():
            continue
        raw = Path(value.strip().replace("\\", "/")).expanduser()
        cands = [raw] if raw.is_absolute() else [json_dir / raw, audio_dir / raw]
        for cand in cands:
            if cand.is_file():
                return cand
        matches = by_name.get(raw.name, [])
        if len(matches) == 1:
            return matches[0]
    return None


def _from_json(
    audio_dir: Path, dataset_json: Path, allow_outside: bool, exclude: Iterable[Path]
) -> tuple[list[Item], list[Failure], DatasetSettings]:
    settings, entries = load_dataset_json(dataset_json)
    by_name: dict[str, list[Path]] = {}
    for p in discover_audio(audio_dir, exclude):
        by_name.setdefault(p.name, []).append(p)
    items, failures = [], []
    seen: dict[str, int] = {}
    for n, entry in enumerate(entries):
        label = f"{dataset_json.name}[{n}]"
        if not isinstance(entry, dict):
            failures.append(Failure(label, "unreadable metadata: sample entry is not an object"))
            continue
        named = entry.get("audio_path") or entry.get("filename")
        if not isinstance(named, str) or not named.strip():
            failures.append(Failure(label, "unreadable metadata: sample has neither audio_path nor filename"))
            continue
        path = _locate(entry, audio_dir, dataset_json.parent, by_name)
        if path is None:
            failures.append(Failure(named, f"audio file not found (listed in {label})"))
            continue
        if not allow_outside and not _inside(path, audio_dir):
            failures.append(
                Failure(named, f"resolves outside the dataset folder to {path.resolve()} (allow outside paths to use it)")
            )
            continue
        rel = relpath(path, audio_dir)
        count = seen.get(rel, 0) + 1
        seen[rel] = count
        sample_id = rel if count == 1 else f"{rel}#{count}"
        items.append(Item(sample_id, path, rel, json_entry_meta(entry)))
    return items, failures, settings


def collect_items(
    audio_dir: str | Path,
    *,
    dataset_json: Optional[str | Path] = None,
    allow_outside: bool = False,
    exclude: Iterable[Path] = (),
) -> tuple[list[Item], list[Failure], DatasetSettings]:
    """The samples of a dataset folder (and optional dataset JSON), the ones that failed already, and the
    dataset-wide settings."""
    audio_dir = Path(audio_dir).expanduser()
    if not audio_dir.is_dir():
        raise ValueError(f"{audio_dir}: audio folder does not exist")
    if dataset_json is not None:
        return _from_json(audio_dir, Path(dataset_json).expanduser(), allow_outside, exclude)
    items, failures = _from_folder(audio_dir, exclude)
    return items, failures, DatasetSettings()
