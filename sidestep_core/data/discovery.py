"""Which audio files make up the dataset, and the metadata each one gets.

Without a dataset JSON every audio file under the folder (recursively) is a sample, described by its sidecars or
by defaults. With one, the JSON's samples are the dataset; their paths must resolve inside the dataset folder
unless the user allows outside paths (a JSON from elsewhere must not make us read arbitrary files).

Only regular files are read. Symbolic links to files are followed when their target is inside the folder, and
outside it only with ``allow_outside`` (the rule for JSON paths), each with a note naming the target; links to
folders are not entered. FIFOs, devices, sockets, broken links and link loops are listed as skipped with the
reason — opening a FIFO named ``song.wav`` would wait forever.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .metadata import (
    DatasetSettings,
    MetadataError,
    SampleMeta,
    fill_from_labels,
    json_entry_meta,
    load_dataset_json,
    read_sidecars,
)

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
        return f"{_lexical(Path(head), root)}: {rest}"  # the name as written: a link's own, not its target's
    return text


_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def _not_regular(path: Path) -> Optional[str]:
    """Why ``path`` (links followed) is not a regular file to read, or None when it is one."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        if exc.errno == errno.ENOENT and path.is_symlink():
            return "a broken symbolic link"
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'a special file')})"


def _is_file(path: Path) -> bool:
    """``Path.is_file`` that says no, instead of raising, for names the file system cannot hold."""
    try:
        return path.is_file()
    except OSError:
        return False


def scan_audio(
    root: Path, exclude: Iterable[Path] = (), allow_outside: bool = False
) -> tuple[list[Path], list[Failure], dict[Path, str]]:
    """Audio files under ``root`` (recursive, sorted), skipping hidden entries and the ``exclude`` folders.

    Returns the usable files, the entries skipped with a reason, and a note for every symbolic link followed.
    """
    skip = {p.resolve() for p in exclude}
    found: list[Path] = []
    failures: list[Failure] = []
    notes: dict[Path, str] = {}
    root_real = root.resolve()

    def unreadable(exc: OSError) -> None:
        where = Path(exc.filename or root)
        failures.append(Failure(_lexical(where, root) + "/", f"folder cannot be read ({exc.strerror or exc})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if d.startswith(".") or (here / d).resolve() in skip:
                continue
            if (here / d).is_symlink():
                failures.append(Failure(_lexical(here / d, root) + "/", "a symbolic link to a folder (not entered)"))
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            path = here / name
            if name.startswith(".") or Path(name).suffix.lower() not in AUDIO_EXTENSIONS:
                continue
            rel = _lexical(path, root)
            if not _utf8(rel):  # the manifest, the cache's headers and the terminal all need text
                failures.append(Failure(_printable(rel), "the file name is not valid UTF-8 (rename the file)"))
                continue
            why = _not_regular(path)
            if why is None and path.is_symlink():
                target = path.resolve()
                inside = _inside(target, root_real)
                if not inside and not allow_outside:
                    why = f"a symbolic link to {target}, outside the audio folder (allow outside paths to use it)"
                else:
                    notes[path] = f"followed the symbolic link to {target if not inside else relpath(target, root)}"
            if why is not None:
                failures.append(Failure(rel, why))
                continue
            found.append(path)
    return found, failures, notes


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes of the file name, kept as surrogates by Python
        return False


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def discover_audio(root: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """The usable audio files of :func:`scan_audio`."""
    return scan_audio(root, exclude)[0]


def _lexical(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as written (links not resolved), so a link keeps its own name."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _from_folder(audio_dir: Path, exclude: Iterable[Path], allow_outside: bool) -> tuple[list[Item], list[Failure]]:
    items = []
    paths, failures, notes = scan_audio(audio_dir, exclude, allow_outside)
    for path in paths:
        rel = _lexical(path, audio_dir)
        try:
            inside = None if allow_outside else audio_dir
            meta = fill_from_labels(read_sidecars(path, inside) or SampleMeta(), path, inside)
        except MetadataError as exc:
            failures.append(Failure(rel, f"unreadable metadata: {_relative_message(exc, audio_dir)}"))
            continue
        if path in notes:
            meta.warnings.insert(0, notes[path])
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
            if _is_file(cand):
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
    for p in scan_audio(audio_dir, exclude, allow_outside)[0]:
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
        if len(named) > 4096:
            failures.append(Failure(named[:60] + "…", f"unreadable metadata: a path of {len(named)} characters "
                                                       f"(listed in {label})"))
            continue
        path = _locate(entry, audio_dir, dataset_json.parent, by_name)
        if path is None:
            failures.append(Failure(named, f"audio file not found (listed in {label})"))
            continue
        if not allow_outside and not _inside(path, audio_dir):
            failures.append(
                Failure(named, f"resolves outside the dataset folder to {path.resolve()} (allow outside paths to "
                               "use it)")
            )
            continue
        rel = relpath(path, audio_dir)
        count = seen.get(rel, 0) + 1
        seen[rel] = count
        sample_id = rel if count == 1 else f"{rel}#{count}"
        try:
            meta = fill_from_labels(json_entry_meta(entry), path, None if allow_outside else audio_dir)
        except MetadataError as exc:
            failures.append(Failure(rel, f"unreadable metadata: {_relative_message(exc, audio_dir)}"))
            continue
        items.append(Item(sample_id, path, rel, meta))
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
    items, failures = _from_folder(audio_dir, exclude, allow_outside)
    return items, failures, DatasetSettings()
