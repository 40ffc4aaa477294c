"""Reading tensor folders made by ACE-Step's own preprocessing or by Side-Step: one ``.pt`` dict per sample
(``target_latents``, ``attention_mask``, ``encoder_hidden_states``, ``encoder_attention_mask``,
``context_latents``, ``metadata``), optionally listed by ``manifest.json`` as ``{"samples": [paths]}``.

Only ``torch.load(weights_only=True)`` is used: tensors and plain Python values load, arbitrary pickled objects
do not.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .cache import MANIFEST, TENSOR_KEYS, Sample, read_manifest


def _load(path: Path) -> dict:
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # pre-zip serialisation format
    except Exception as exc:  # truncated zip, not a torch file, objects refused by weights_only
        if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
            # torch's message goes on for lines, and suggests loading the file unsafely
            raise ValueError(f"{path}: holds Python objects other than tensors (not loaded, for safety)") from exc
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        reason = text if any(ch.isalpha() for ch in text) else f"{type(exc).__name__} {text}".strip()
        raise ValueError(f"{path}: cannot be read as a preprocessed tensor file ({reason})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of tensors")
    return data


def load_legacy_tensors(path: Path) -> dict[str, torch.Tensor]:
    data = _load(path)
    missing = [k for k in TENSOR_KEYS if not isinstance(data.get(k), torch.Tensor)]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}")
    out = {k: data[k] for k in TENSOR_KEYS}
    # Side-Step stores the mask in the model dtype, ACE-Step as bool; batch dims of 1 may be left in.
    for k in TENSOR_KEYS:
        t = out[k]
        want = 1 if k == "encoder_attention_mask" else 2
        while t.ndim > want and t.shape[0] == 1:
            t = t[0]
        out[k] = t
    out["encoder_attention_mask"] = out["encoder_attention_mask"].bool()
    t, c = out["target_latents"].shape, out["context_latents"].shape
    if c[0] != t[0]:
        raise ValueError(f"{path}: context_latents has {c[0]} frames but target_latents {t[0]}")
    return out


def read_legacy_metadata(path: Path) -> dict:
    meta = _load(path).get("metadata")
    return dict(meta) if isinstance(meta, dict) else {}


def _listed(folder: Path) -> list[Path]:
    manifest = read_manifest(folder)
    if manifest and isinstance(manifest.get("samples"), list):
        paths = []
        for entry in manifest["samples"]:
            raw = entry if isinstance(entry, str) else (entry.get("path") if isinstance(entry, dict) else None)
            if not raw:
                continue
            p = Path(str(raw).replace("\\", "/"))
            if not p.is_absolute():
                p = folder / p
            # manifests written on another machine, and entries that point out of the folder (never read):
            # fall back to the file name here
            if not _within(p, folder) or not p.is_file():
                p = folder / p.name
            if not p.is_file():
                raise ValueError(f"{folder / MANIFEST}: lists {raw}, which does not exist")
            paths.append(p)
        return paths
    return sorted(p for p in folder.glob("*.pt") if not p.name.endswith(".tmp.pt"))


def _within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False


def load_legacy_folder(folder: Path) -> list[Sample]:
    paths = _listed(folder)
    if not paths:
        raise ValueError(f"{folder}: no preprocessed samples (no {MANIFEST} of ours and no .pt files)")
    return [Sample(p.stem, p, "legacy-pt") for p in paths]
