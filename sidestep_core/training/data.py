"""Training data: the preprocessed tensor cache, coverage-aware crops, length-bucketed batches, padded collate.

The data order is a pure function of (seed, epoch, rank): resuming at any step rebuilds the same epoch plan and
skips to the saved position, so no sampler object has to be pickled.

Crops: a clip of T frames longer than the crop length C is split into K = floor(T / C) + 1 evenly spaced,
overlapping windows that together cover every frame. Each visit (one per epoch) takes the next window of a seeded
permutation of the K windows, with a jitter small enough to keep the cover, so every part of a long song is seen
once every K epochs.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import safe_open

from ..data.metadata import MAX_REPEAT

FRAMES_PER_SECOND = 25  # 48 kHz / 1920
REQUIRED = ("target_latents", "encoder_hidden_states", "context_latents")


@dataclass(frozen=True)
class Clip:
    name: str
    path: Path
    frames: int  # T of target_latents
    cond_len: int  # L of encoder_hidden_states
    repeat: int = 1  # visits per epoch (the dataset's per-sample "repeat")
    sample: Any = None  # the data.cache.Sample it came from (legacy .pt samples are read through it)
    widths: tuple[int, ...] = ()  # of target_latents, context_latents, encoder_hidden_states


@dataclass(frozen=True)
class Item:
    clip: int  # index into the dataset's clip list
    start: int
    length: int


@dataclass
class Batch:
    target_latents: torch.Tensor  # [B, T, 64]
    context_latents: torch.Tensor  # [B, T, 128]
    encoder_hidden_states: torch.Tensor  # [B, L, H]
    encoder_attention_mask: torch.Tensor  # [B, L] bool
    frame_mask: torch.Tensor  # [B, T] bool, True on real frames
    items: list[Item]
    # Known on the host when the batch is built, so the loss never reads the mask back from the device to learn it.
    padded: bool = True

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.target_latents, self.context_latents, self.encoder_hidden_states, self.encoder_attention_mask,
                self.frame_mask)

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"  # asynchronous only from pinned memory (pin_memory); otherwise a plain copy
        return Batch(*(t.to(device, non_blocking=nb) for t in self._tensors()), self.items, self.padded)

    def pin_memory(self) -> "Batch":
        return Batch(*(t.pin_memory() for t in self._tensors()), self.items, self.padded)


# ----------------------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------------------


class LatentDataset:
    """Clips of a preprocessed cache; tensors are read lazily per batch (memory-mapped slices of the crop)."""

    def __init__(self, clips: list[Clip], trigger_tag: str = "", root: Optional[Path] = None,
                 skipped: Optional[list[str]] = None):
        self.clips = clips
        self.trigger_tag = trigger_tag
        self.root = root
        self.skipped = skipped or []  # why each unreadable sample was left out (its path first)

    def skipped_notes(self) -> list[str]:
        return [f"skipped {reason} — preprocess its song again to train on it" for reason in self.skipped]

    def __len__(self) -> int:
        return len(self.clips)

    def subset(self, indices: list[int]) -> "LatentDataset":
        return LatentDataset([self.clips[i] for i in indices], self.trigger_tag, self.root)

    def load(self, item: Item) -> dict[str, torch.Tensor]:
        clip = self.clips[item.clip]
        sl = slice(item.start, item.start + item.length)
        if clip.path.suffix != ".safetensors":  # legacy .pt: no partial reads
            data = clip.sample.load()
            out = {k: data[k] for k in ("target_latents", "context_latents", "encoder_hidden_states",
                                        "encoder_attention_mask")}
            out["target_latents"], out["context_latents"] = out["target_latents"][sl], out["context_latents"][sl]
        else:
            try:
                with safe_open(str(clip.path), framework="pt", device="cpu") as f:
                    out = {
                        "target_latents": f.get_slice("target_latents")[sl],
                        "context_latents": f.get_slice("context_latents")[sl],
                        "encoder_hidden_states": f.get_tensor("encoder_hidden_states"),
                        "encoder_attention_mask": f.get_tensor("encoder_attention_mask")
                        if "encoder_attention_mask" in f.keys() else torch.ones(clip.cond_len, dtype=torch.bool),
                    }
            except Exception as exc:
                raise ValueError(f"{clip.path}: cannot read cached tensors ({exc})") from exc
        for k in ("target_latents", "context_latents", "encoder_hidden_states"):
            out[k] = out[k].float()
        out["encoder_attention_mask"] = out["encoder_attention_mask"].bool()
        return out


def open_dataset(path: str | Path) -> LatentDataset:
    """Open a preprocessed folder through ``sidestep_core.data.cache.load_dataset`` (our cache, or legacy ACE-Step /
    Side-Step ``.pt`` folders). Only shapes are read here; tensors are read per batch. A sample that cannot be read
    (a damaged or foreign file) is left out and named in ``skipped``; only a folder with none readable is refused."""
    from ..data.cache import load_dataset, read_manifest

    root = Path(path).expanduser()
    samples = load_dataset(root)
    if not samples:
        raise ValueError(f"{root}: no preprocessed samples (run `sidestep preprocess` first)")
    clips, skipped = [], []
    for sample in samples:
        try:
            clips.append(_clip(sample))
        except ValueError as exc:
            skipped.append(str(exc))
    if not clips:
        raise ValueError(f"{root}: no readable preprocessed sample ({'; '.join(skipped)})")
    # files of another model's cache mixed in (copied over, a manifest edited) would fail mid-run when drawn: the
    # widths most clips share are the dataset's (the model is checked against them before training)
    common = Counter(c.widths for c in clips).most_common(1)[0][0]
    skipped += [f"{c.path}: widths {list(c.widths)} differ from the rest of the dataset's {list(common)}"
                for c in clips if c.widths != common]
    clips = [c for c in clips if c.widths == common]
    manifest = read_manifest(root) or {}
    trigger = str(manifest.get("trigger_tag") or "")
    if not trigger:  # the tag the samples share, if they all have one
        tags = {str(s.metadata.get("custom_tag") or "") for s in samples if s.format == "sidestep"}
        trigger = tags.pop() if len(tags) == 1 else ""
    return LatentDataset(clips, trigger, root, skipped)


def _clip(sample: Any) -> Clip:
    path = Path(sample.path)
    repeat = sample.metadata.get("repeat") if sample.format == "sidestep" else None
    # preprocessing lowers repeat to MAX_REPEAT; a manifest edited or written elsewhere is held to it too (10**12
    # visits per epoch would be a list that fills the memory; Infinity would not even convert)
    repeat = min(int(repeat), MAX_REPEAT) if isinstance(repeat, (int, float)) and 1 <= repeat < math.inf else 1
    if not path.is_file():
        raise ValueError(f"{path}: listed in the dataset but missing")
    if path.suffix != ".safetensors":
        try:
            data = sample.load()
        except Exception as exc:
            raise ValueError(f"{path}: not a readable sample ({exc})") from exc
        t, c, e = (tuple(data[k].shape) for k in ("target_latents", "context_latents", "encoder_hidden_states"))
        return _checked_clip(sample, path, t, c, e, repeat)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            missing = [k for k in REQUIRED if k not in keys]
            if missing:
                raise ValueError(f"{path}: not a training sample, missing {', '.join(missing)}")
            t = f.get_slice("target_latents").get_shape()
            c = f.get_slice("context_latents").get_shape()
            e = f.get_slice("encoder_hidden_states").get_shape()
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: not a readable safetensors sample ({exc})") from exc
    return _checked_clip(sample, path, t, c, e, repeat)


def _checked_clip(sample: Any, path: Path, t, c, e, repeat: int) -> Clip:
    if len(t) != 2 or len(c) != 2 or c[0] != t[0] or len(e) != 2:
        raise ValueError(f"{path}: expected target_latents [T,64], context_latents [T,128], "
                         f"encoder_hidden_states [L,H]; got {list(t)}, {list(c)}, {list(e)}")
    return Clip(str(sample.id), path, int(t[0]), int(e[0]), repeat, sample, (int(t[1]), int(c[1]), int(e[1])))


# ----------------------------------------------------------------------------------------------------------
# crops and epochs
# ----------------------------------------------------------------------------------------------------------


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def crop_for_visit(frames: int, crop: int, seed: int, clip: int, visit: int) -> tuple[int, int]:
    """(start, length) of the crop of ``clip`` on its ``visit``-th visit. ``crop`` 0 = the whole clip."""
    if crop <= 0 or frames <= crop:
        return 0, frames
    # floor(T/C) + 1 windows: the spacing (T−C)/floor(T/C) is always < C, so neighbours overlap and leave room
    # for jitter even when T is an exact multiple of C.
    k = frames // crop + 1
    step = (frames - crop) / (k - 1)
    cycle, pos = divmod(visit, k)
    window = int(_rng(seed, 1, clip, cycle).permutation(k)[pos])
    start = window * step
    if 0 < window < k - 1:  # end windows stay put so the first and last frames are always covered
        slack = (crop - step) / 2
        start += _rng(seed, 2, clip, visit).uniform(-slack, slack)
    start = min(max(int(round(start)), 0), frames - crop)
    return start, crop


def plan_epoch(
    frames: list[int], crop: int, batch_size: int, seed: int, epoch: int, world: int = 1, rank: int = 0,
    repeats: Optional[list[int]] = None,
) -> list[list[Item]]:
    """Micro-batches of this rank for ``epoch``: shuffled, length-bucketed, padded so every rank gets as many.
    A clip with ``repeats[i] = r`` is visited r times per epoch (visits ``epoch·r … epoch·r + r − 1``)."""
    rng = _rng(seed, 3, epoch)
    repeats = repeats or [1] * len(frames)
    visits = [(i, epoch * repeats[i] + j) for i in range(len(frames)) for j in range(repeats[i])]
    order = rng.permutation(len(visits))
    items = [Item(visits[o][0], *crop_for_visit(frames[visits[o][0]], crop, seed, visits[o][0], visits[o][1]))
             for o in order]
    batches: list[list[Item]] = []
    mega = batch_size * 8  # sort within small windows of the shuffled order: similar lengths, still random
    for s in range(0, len(items), mega):
        chunk = sorted(items[s:s + mega], key=lambda it: -it.length)
        batches.extend(chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size))
    if batch_size > 1:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    n = len(batches)
    while len(batches) % world:
        batches.append(batches[len(batches) % n])
    return batches[rank::world]


def split_validation(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) clip indices; the held-out clips are a seeded choice, at least one when fraction > 0."""
    if fraction <= 0:
        return list(range(n)), []
    k = max(1, int(round(n * fraction)))
    if k >= n:
        raise ValueError(f"val_split: {fraction} leaves no training clips out of {n}")
    perm = _rng(seed, 4).permutation(n)
    val = sorted(int(i) for i in perm[:k])
    return [i for i in range(n) if i not in set(val)], val


def validation_items(frames: list[int], crop: int) -> list[Item]:
    """Fixed crops for validation: the centre window of each clip."""
    out = []
    for i, t in enumerate(frames):
        length = t if crop <= 0 or t <= crop else crop
        out.append(Item(i, (t - length) // 2, length))
    return out


# ----------------------------------------------------------------------------------------------------------
# collate
# ----------------------------------------------------------------------------------------------------------


def collate(samples: list[dict[str, torch.Tensor]], items: list[Item]) -> Batch:
    """Zero-pad to the longest clip and the longest condition in the batch; masks mark what is real."""
    b = len(samples)
    t = max(s["target_latents"].shape[0] for s in samples)
    length = max(s["encoder_hidden_states"].shape[0] for s in samples)
    c_lat = samples[0]["target_latents"].shape[1]
    c_ctx = samples[0]["context_latents"].shape[1]
    h = samples[0]["encoder_hidden_states"].shape[1]
    x0 = torch.zeros(b, t, c_lat)
    ctx = torch.zeros(b, t, c_ctx)
    cond = torch.zeros(b, length, h)
    cond_mask = torch.zeros(b, length, dtype=torch.bool)
    frame_mask = torch.zeros(b, t, dtype=torch.bool)
    for i, s in enumerate(samples):
        n, m = s["target_latents"].shape[0], s["encoder_hidden_states"].shape[0]
        x0[i, :n] = s["target_latents"]
        ctx[i, :n] = s["context_latents"]
        cond[i, :m] = s["encoder_hidden_states"]
        cond_mask[i, :m] = s["encoder_attention_mask"][:m]
        frame_mask[i, :n] = True
    return Batch(x0, ctx, cond, cond_mask, frame_mask, list(items), padded=not bool(frame_mask.all()))


def load_batch(dataset: LatentDataset, items: list[Item]) -> Batch:
    return collate([dataset.load(it) for it in items], items)
