"""Atomic file writes: a temporary file in the destination folder, fsync, then rename into place."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import save_file


def _temp_in(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    return Path(name)


def _replace(tmp: Path, dest: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dest)


def atomic_write_bytes(dest: str | Path, data: bytes) -> None:
    dest = Path(dest)
    tmp = _temp_in(dest)
    try:
        tmp.write_bytes(data)
        _replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(dest: str | Path, obj: Any) -> None:
    atomic_write_bytes(dest, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def atomic_save_file(
    tensors: Mapping[str, torch.Tensor], dest: str | Path, metadata: Optional[Mapping[str, str]] = None
) -> None:
    """``safetensors.torch.save_file`` made atomic; tensors are made contiguous first."""
    dest = Path(dest)
    tmp = _temp_in(dest)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
        _replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
