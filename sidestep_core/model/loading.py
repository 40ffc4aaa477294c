"""Load an ACE-Step 1.5 model from any layout a user has.

1. an original ACE-Step DiT folder (``config.json`` + ``model.safetensors`` or a sharded index);
2. a ComfyUI ``diffusion_models`` file (no prefix, ``diffusion_model.`` or ``model.diffusion_model.``);
3. a ComfyUI all-in-one checkpoint (``model.diffusion_model.*`` + ``text_encoders.*`` + ``vae.*``).

Weights are read from memory-mapped safetensors straight into a model built on the meta device, so they are
never held twice.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import safe_open

from .config import AceStepConfig
from .model import AceStepModel
from .variants import ModelInfo, build_info, detect_variant

ANCHOR = "decoder.layers.0.self_attn_norm.weight"
KNOWN_PREFIXES = ("", "diffusion_model.", "model.diffusion_model.", "model.", "net.")
SILENCE_LATENT_NAME = "silence_latent.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and, where it applies, the key."""


@dataclass
class SafetensorsSource:
    """Tensors spread over one or more safetensors files, addressed by their names without ``prefix``."""

    files: dict[str, Path]  # key (prefix stripped) -> file
    prefix: str = ""
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def keys(self) -> Iterable[str]:
        return self.files.keys()

    def get(self, key: str) -> torch.Tensor:
        path = self.files[key]
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return f.get_tensor(self.prefix + key)
        except Exception as exc:  # truncated data region, I/O error
            raise CheckpointError(f"{path}: cannot read tensor {self.prefix + key!r}: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------
# safetensors inspection
# ----------------------------------------------------------------------------------------------------------


def read_header(path: Path) -> dict:
    """Parse a safetensors header with clear errors for files that are not safetensors or are cut short."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: file is too short to be safetensors ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointError(
                    f"{path}: not a safetensors file (pickled .ckpt/.pt checkpoints are not loaded, for safety)"
                )
            header = json.loads(fh.read(n))
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from exc
    data_len = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + data_len > size:
        raise CheckpointError(
            f"{path}: truncated — header describes {8 + n + data_len} bytes but the file has {size}"
        )
    return header


def tensor_shapes(header: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def weights_identity(paths: list[Path]) -> str:
    """Stable identity of a set of safetensors files: headers, sizes and 64 evenly spaced 64 KiB samples.

    Fine-tunes rewrite essentially every byte, so sampling tells them apart without hashing gigabytes.
    """
    h = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        size = path.stat().st_size
        h.update(path.name.encode() + str(size).encode())
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h.update(fh.read(n))
            data_start, chunk, samples = 8 + n, 1 << 16, 64
            span = max(size - data_start - chunk, 0)
            for i in range(samples):
                fh.seek(data_start + (span * i) // max(samples - 1, 1))
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# layout discovery
# ----------------------------------------------------------------------------------------------------------


def _find_prefix(shapes: dict[str, tuple[int, ...]], path: Path) -> str:
    hits = [k[: -len(ANCHOR)] for k in shapes if k.endswith(ANCHOR)]
    hits = [p for p in hits if p in KNOWN_PREFIXES] or hits
    if not hits:
        raise CheckpointError(
            f"{path}: no ACE-Step 1.5 DiT found (missing '{ANCHOR}' under any known prefix)"
        )
    return min(hits, key=len)


def _dit_folder(path: Path) -> Optional[Path]:
    """``path`` if it is an ACE-Step DiT folder (not, say, the Qwen3 text encoder sitting beside it)."""
    if not (path / "config.json").is_file():
        return None
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return None
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return path  # let the loader report the broken config with its path
    if not isinstance(cfg, dict):
        return path
    kind = str(cfg.get("model_type", "")) + " ".join(map(str, cfg.get("architectures") or []))
    if "acestep" in kind.lower() or not kind:
        return path
    return None


def resolve_dit_folder(path: Path) -> Optional[Path]:
    """A DiT folder, or a checkpoints root holding exactly one (e.g. ``acestep-v15-turbo``)."""
    if _dit_folder(path):
        return path
    if path.is_dir():
        subs = [p for p in sorted(path.iterdir()) if p.is_dir() and _dit_folder(p)]
        if len(subs) == 1:
            return subs[0]
        if len(subs) > 1:
            names = ", ".join(p.name for p in subs)
            raise CheckpointError(f"{path}: holds several ACE-Step models ({names}); point at one of them")
    return None


def open_source(path: Path) -> tuple[SafetensorsSource, Optional[AceStepConfig], str, list[Path]]:
    """Return the tensor source, the config from config.json (if any), the layout and the files read."""
    folder = resolve_dit_folder(path) if path.is_dir() else None
    if path.is_dir() and folder is None:
        raise CheckpointError(f"{path}: not an ACE-Step model folder (no config.json with model.safetensors)")
    if folder is not None:
        config = AceStepConfig.from_json(folder / "config.json")
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: unreadable shard index ({exc})") from exc
            shard_paths = {name: folder / name for name in set(weight_map.values())}
            for p in shard_paths.values():
                if not p.is_file():
                    raise CheckpointError(f"{index}: shard {p.name} is missing")
            files = {k: shard_paths[v] for k, v in weight_map.items()}
        else:
            shard_paths = {"model.safetensors": folder / "model.safetensors"}
            files = {}
        shapes: dict[str, tuple[int, ...]] = {}
        metadata: dict[str, str] = {}
        for p in shard_paths.values():
            header = read_header(p)
            metadata.update(header.get("__metadata__") or {})
            for k, s in tensor_shapes(header).items():
                shapes[k] = s
                files.setdefault(k, p)
        prefix = _find_prefix(shapes, folder)
        src = SafetensorsSource(
            {k[len(prefix):]: files[k] for k in shapes if k.startswith(prefix)},
            prefix,
            {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)},
            metadata,
        )
        return src, config, "original", sorted(set(shard_paths.values()))

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    header = read_header(path)
    shapes = tensor_shapes(header)
    prefix = _find_prefix(shapes, path)
    layout = "comfyui-aio" if any(k.startswith(("vae.", "text_encoders.")) for k in shapes) else "comfyui-split"
    keep = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
    config = None
    meta = header.get("__metadata__") or {}
    if "config" in meta:  # written by our own tools
        try:
            config = AceStepConfig.from_dict(json.loads(meta["config"]))
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: metadata 'config' is invalid ({exc})") from exc
    return SafetensorsSource({k: path for k in keep}, prefix, keep, meta), config, layout, [path]


# ----------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: AceStepModel
    config: AceStepConfig
    info: ModelInfo
    silence_latent: Optional[torch.Tensor]  # [1, T, 64] fp32, or None when the layout carries none
    source: SafetensorsSource


def _check_keys(model: AceStepModel, src: SafetensorsSource, path: Path, parts: Optional[set[str]]) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if _wanted(k, parts)}
    present = {k: s for k, s in src.shapes.items() if _wanted(k, parts)}
    check_architecture(path, src.prefix, expected, present)


def check_architecture(path: Path, prefix: str, expected: dict[str, tuple], present: dict[str, tuple]) -> None:
    """Raise a :class:`CheckpointError` naming the missing, unexpected and wrongly shaped tensors of a file
    (``expected``: the model's names and shapes; ``present``: the file's, without its ``prefix``)."""
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    wrong = [
        f"{prefix}{k}: file {present[k]} vs model {expected[k]}"
        for k in sorted(set(expected) & set(present))
        if present[k] != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(prefix + k for k in missing[:8]))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(prefix + k for k in unexpected[:8]))
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): " + "; ".join(wrong[:8]))
    if problems:
        raise CheckpointError(f"{path}: does not match the ACE-Step 1.5 architecture — " + " | ".join(problems))


def _wanted(key: str, parts: Optional[set[str]]) -> bool:
    return parts is None or key.split(".", 1)[0] in parts


def _load_silence_latent(folder: Optional[Path]) -> Optional[torch.Tensor]:
    """``silence_latent.pt`` next to the DiT, or one level up (upstream keeps it per variant)."""
    if folder is None:
        return None
    for cand in (folder / SILENCE_LATENT_NAME, folder.parent / SILENCE_LATENT_NAME):
        if cand.is_file():
            try:
                t = torch.load(cand, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"{cand}: cannot be read as a tensor ({exc})") from exc
            if not isinstance(t, torch.Tensor) or t.ndim != 3:
                raise CheckpointError(f"{cand}: expected a [1, 64, T] tensor")
            return t.float().transpose(1, 2).contiguous()
    return None


def _move_derived_buffers(model: torch.nn.Module, device) -> None:
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[name] = buf.to(device)


def load_acestep(
    path: str | Path,
    *,
    variant: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    device: str | torch.device = "cpu",
    parts: Optional[Iterable[str]] = None,
) -> LoadedModel:
    """Load a model and describe it.

    ``variant`` states the base model when config and names do not tell (fine-tunes in odd folders).
    ``dtype``: None keeps the stored dtype. ``parts``: load only these top-level modules
    (e.g. ``{"decoder"}`` for training, ``{"encoder", "null_condition_emb"}`` for preprocessing); the others
    stay on the meta device and take no memory.
    """
    path = Path(path).expanduser()
    src, config, layout, files = open_source(path)
    if config is None:
        try:
            config = AceStepConfig.infer_from_state_dict(src.shapes)
        except KeyError as exc:
            raise CheckpointError(f"{path}: cannot infer the architecture, tensor {exc} is missing") from exc

    part_set = set(parts) if parts is not None else None
    with torch.device("meta"):
        model = AceStepModel(config)
    _check_keys(model, src, path, part_set)

    state = {}
    for key in model.state_dict():
        if not _wanted(key, part_set):
            continue
        t = src.get(key)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[key] = t.to(device)
    model.load_state_dict(state, strict=False, assign=True)
    _move_derived_buffers(model, device)
    model.eval().requires_grad_(False)

    folder = files[0].parent if layout == "original" else None
    names = [p for p in (folder.name if folder else "", path.name, path.stem) if p]
    detected = detect_variant(config, names, variant)
    info = build_info(config, detected, weights_identity(files), str(path), layout)
    return LoadedModel(model, config, info, _load_silence_latent(folder), src)
