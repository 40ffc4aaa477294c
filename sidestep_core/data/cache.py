"""The preprocessed-tensor cache: one safetensors file per sample plus ``manifest.json`` (docs/CACHE_FORMAT.md).

Files are named by their content key, a hash of the audio bytes, the metadata that reaches the prompts, the
settings that change tensors and the identities of the weights, so a re-run reuses every file whose inputs did
not change. :func:`load_dataset` reads this cache and legacy ACE-Step / Side-Step ``.pt`` folders alike.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..fsutil import atomic_write_bytes, atomic_write_json

FORMAT = "sidestep-preprocessed"
# 2: the XL condition encoder now follows upstream (timbre special token, padded lyric windows), so every
# sample key changes and caches made before are encoded again instead of reused with the old states.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
WORK_DIR = ".work"  # pass-1 intermediates and the derived silence latent
TENSOR_KEYS = ("target_latents", "encoder_hidden_states", "encoder_attention_mask", "context_latents")
_SAMPLE_FILE = re.compile(r"^[0-9a-f]{32}\.safetensors$")
_META_KEY = "sidestep"  # safetensors header metadata entry holding the sample's manifest record


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_key(**parts: Any) -> str:
    """32 hex digits identifying everything that determines a sample's tensors."""
    payload = canonical_json({"format_version": FORMAT_VERSION, **parts})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def sample_filename(key: str) -> str:
    return f"{key}.safetensors"


def is_sample_filename(name: str) -> bool:
    return bool(_SAMPLE_FILE.match(name))


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class AudioHashIndex:
    """sha256 of audio files, reused while a file's size and mtime are unchanged (no re-reading on re-runs)."""

    def __init__(self, previous: Optional[dict] = None):
        # an index of another shape (another version, an edit) is only a cache: unusable entries are re-hashed
        self._old = {k: v for k, v in previous.items() if isinstance(v, dict)} if isinstance(previous, dict) else {}
        self.entries: dict[str, dict] = {}

    def sha256(self, path: Path, rel: str) -> str:
        st = path.stat()
        old = self._old.get(rel) or self.entries.get(rel)
        if (old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns
                and isinstance(old.get("sha256"), str)):
            digest = old["sha256"]
        else:
            digest = file_sha256(path)
        self.entries[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        return digest


# ----------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], record: Optional[dict] = None) -> None:
    """Atomic safetensors write; ``record`` (JSON) goes into the header so the file describes itself."""
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    if record is not None:
        meta[_META_KEY] = canonical_json(record)
    write_safetensors(path, tensors, meta)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomic safetensors write whose failures are OSErrors naming the file.

    Serialised here and written by Python: safetensors' own writer reports a full disk as a SafetensorError
    without the path. Cache files are a few MB at most."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def read_record(path: Path) -> Optional[dict]:
    """The record stored in a sample file's header, or None when the file is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
    except Exception:
        return None
    if _META_KEY not in meta:
        return None
    try:
        record = json.loads(meta[_META_KEY])
    except ValueError:
        return None
    record["_tensors"] = sorted(keys)
    return record


def read_manifest(folder: Path) -> Optional[dict]:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def prompt_style(folder: Path) -> str:
    """The prompt style the dataset was preprocessed for (its manifest's; upstream's when it names none)."""
    from ..text.prompts import ACESTEP

    return (read_manifest(Path(folder)) or {}).get("prompt_style", ACESTEP)


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = folder / MANIFEST
    atomic_write_json(path, manifest)
    return path


# ----------------------------------------------------------------------------------------------------------
# reading a dataset for training
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One preprocessed sample. Tensors are read only when :meth:`load` is called.

    ``load()`` returns ``target_latents [T, 64]``, ``encoder_hidden_states [L, H]``, ``encoder_attention_mask
    [L]`` (bool) and ``context_latents [T, 128]``.
    """

    id: str
    path: Path
    format: str  # "sidestep" | "legacy-pt"
    _metadata: Optional[dict] = field(default=None, repr=False)

    @property
    def metadata(self) -> dict:
        if self._metadata is None:
            from .legacy import read_legacy_metadata

            self._metadata = read_legacy_metadata(self.path)
        return self._metadata

    @property
    def duration(self) -> Optional[float]:
        value = self.metadata.get("duration")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def caption(self) -> str:
        return str(self.metadata.get("caption") or "")

    def load(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        if self.format == "sidestep":
            from safetensors.torch import load_file

            try:
                data = load_file(str(self.path), device=str(device))
            except Exception as exc:
                raise ValueError(f"{self.path}: cannot read preprocessed tensors ({exc})") from exc
            missing = [k for k in TENSOR_KEYS if k not in data]
            if missing:
                raise ValueError(f"{self.path}: missing tensors {missing}")
            data["encoder_attention_mask"] = data["encoder_attention_mask"].bool()
            return {k: data[k] for k in TENSOR_KEYS}
        from .legacy import load_legacy_tensors

        return {k: v.to(device) for k, v in load_legacy_tensors(self.path).items()}


def load_dataset(path: str | Path) -> list[Sample]:
    """The samples of a preprocessed folder: this package's cache (``manifest.json`` with our format tag) or an
    ACE-Step / Side-Step folder of ``.pt`` files (read with ``torch.load(weights_only=True)``)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{folder}: preprocessed tensor folder does not exist")
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("format") == FORMAT:
        try:
            version = int(manifest.get("format_version", 0))
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{folder / MANIFEST}: format_version {str(manifest['format_version'])[:40]!r} is not "
                             "a number; re-run preprocessing") from None
        if version > FORMAT_VERSION:
            raise ValueError(f"{folder / MANIFEST}: cache format {version} is newer than this version understands")
        samples = []
        entries = manifest.get("samples", [])
        for entry in entries if isinstance(entries, list) else [None]:
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "id" not in entry:
                raise ValueError(f"{folder / MANIFEST}: a sample entry without 'id' and 'file'; re-run preprocessing")
            # sample files are named by their key, directly in the cache folder: an absolute or ../ entry
            # (a tampered manifest) would make training read files from anywhere
            if not is_sample_filename(entry["file"]):
                raise ValueError(f"{folder / MANIFEST}: refusing sample file {entry['file'][:200]!r}: not a "
                                 "tensor file of this cache folder (absolute or outside paths are never read)")
            # a listed file that is missing is the reader's to report (training leaves it out and says so)
            samples.append(Sample(str(entry["id"]), folder / entry["file"], "sidestep", dict(entry)))
        return samples
    from .legacy import load_legacy_folder

    return load_legacy_folder(folder)
