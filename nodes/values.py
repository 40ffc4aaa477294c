"""Values that travel between the Side-Step nodes, and recognising ACE-Step files by their tensor names.

No ComfyUI import: ``comfy_glue.py`` passes in the folder lists it gets from ``folder_paths``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from sidestep_core.model.loading import ANCHOR, KNOWN_PREFIXES, CheckpointError, read_header, resolve_dit_folder
from sidestep_core.planner.vocab import AUDIO_CODE_OFFSET

# ----------------------------------------------------------------------------------------------------------
# the values
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelBundle:
    """An ACE-Step 1.5 model as paths plus what its headers tell; every node loads only the parts it needs.

    ``checkpoint`` is what ``sidestep_core.model.load_acestep`` takes (a DiT file, an all-in-one file or an
    original folder); ``text_encoder`` / ``vae`` / ``tokenizer`` are None where the core finds them itself.
    """

    checkpoint: Path
    label: str
    variant: str  # as detected, or as the user stated
    stated_variant: Optional[str]
    is_turbo: bool
    shift: float
    steps: int
    guidance: float
    identity: str
    layout: str
    text_encoder: Optional[Path] = None
    vae: Optional[Path] = None
    tokenizer: Optional[Path] = None

    def summary(self) -> str:
        return (f"{self.label}: ACE-Step 1.5 {self.variant} ({self.layout}); generate with shift {self.shift:g}, "
                f"{self.steps} steps, cfg {self.guidance:g}")


@dataclass(frozen=True)
class DatasetRef:
    """A preprocessed dataset: the cache folder the trainer reads."""

    path: Path
    samples: int
    encoded: int
    reused: int
    failures: tuple[tuple[str, str], ...]  # (file, reason)
    identity: str  # hash of the samples' content keys: changes when any sample's tensors would
    trigger_tag: str = ""
    report: tuple[str, ...] = ()  # per-file warnings and the dataset quality report, one line each

    def summary(self) -> str:
        text = f"{self.samples} samples ({self.encoded} encoded, {self.reused} reused) in {self.path}"
        if self.failures:
            text += f"; {len(self.failures)} file(s) failed:\n" + "\n".join(f"  {f}: {r}" for f, r in self.failures)
        return "\n".join((text, *self.report))


@dataclass(frozen=True)
class AdapterRef:
    """A trained adapter: ``path`` is the inference-ready folder (``run/final``)."""

    path: Path
    run_dir: Path
    name: str
    kind: str
    steps: int
    status: str  # complete | stopped
    base_variant: str
    base_identity: str
    checkpoint: Path  # the model it was trained on (PEFT-style DoRA export needs its weights)
    trigger_tag: str = ""


@dataclass(frozen=True)
class EstimateRef:
    """The result of a gradient estimation: targets to train and, optionally, per-module ranks."""

    targets: tuple[str, ...]
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    scores: tuple[tuple[str, float], ...] = ()
    text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# recognising files
# ----------------------------------------------------------------------------------------------------------

_KIND_CACHE: dict[tuple[str, int, int], Optional[str]] = {}
QWEN_ANCHOR = "layers.0.post_attention_layernorm.weight"
VAE_ANCHOR = "decoder.layers.1.layers.0.beta"


def classify(path: str | Path) -> Optional[str]:
    """``acestep`` (a DiT file), ``acestep_aio`` (DiT + text encoder + VAE), ``planner_lm`` (the 5 Hz LM),
    ``qwen_0.6b`` (the 1024-wide Qwen3 text encoder), ``vae`` (an Oobleck VAE), or None. Reads only the safetensors
    header; cached by size and mtime."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return None
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _KIND_CACHE:
        return _KIND_CACHE[key]
    kind = None
    if p.suffix.lower() in (".safetensors", ".sft"):
        try:
            header = read_header(p)
        except (CheckpointError, OSError, ValueError):
            header = {}
        keys = [k for k in header if k != "__metadata__"]
        if any(k.endswith(ANCHOR) and k[: -len(ANCHOR)] in KNOWN_PREFIXES for k in keys):
            kind = "acestep_aio" if any(k.startswith(("vae.", "text_encoders.")) for k in keys) else "acestep"
        elif any(k.endswith(VAE_ANCHOR) for k in keys):
            kind = "vae"
        elif any(k.endswith("embed_tokens.weight") and header[k]["shape"][0] > AUDIO_CODE_OFFSET for k in keys):
            kind = "planner_lm"  # a Qwen3 whose vocabulary holds the audio codes: the 5 Hz LM
        else:
            widths = [header[k]["shape"][0] for k in keys if k.endswith(QWEN_ANCHOR)]
            if widths and widths[0] == 1024:
                kind = "qwen_0.6b"
    _KIND_CACHE[key] = kind
    return kind


def list_files(folders: Iterable[str], kinds: set[str]) -> list[str]:
    """Relative names (with sub-folders, '/'-separated) of the files under ``folders`` of one of ``kinds``."""
    names: set[str] = set()
    for root in folders:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                full = os.path.join(dirpath, fn)
                if classify(full) in kinds:
                    names.add(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(names, key=str.lower)


def list_original_folders(folders: Iterable[str], max_depth: int = 3) -> list[str]:
    """Relative names of original ACE-Step DiT folders (``config.json`` + ``model.safetensors``) under ``folders``."""
    names: set[str] = set()
    for root in folders:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            depth = os.path.relpath(dirpath, root).count(os.sep)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")] if depth < max_depth else []
            try:
                found = resolve_dit_folder(Path(dirpath))
            except CheckpointError:
                found = None
            if found is not None and found == Path(dirpath):
                rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
                if rel != ".":
                    names.add(rel)
                dirnames[:] = []
    return sorted(names, key=str.lower)


def find_in(folders: Iterable[str], name: str) -> Optional[Path]:
    for root in folders:
        cand = Path(root) / name
        if cand.exists():
            return cand
    return None
