"""Apply an adapter to the core model: merged into the weights (and exactly undone), or unmerged through forward
hooks (base weights untouched; strength can change between calls).

``target`` is either the whole :class:`~sidestep_core.model.AceStepModel` (then targets outside the decoder — only
ComfyUI's ``TrainLoraNode`` files have them — are applied too, where their part of the model is loaded) or the
decoder alone (outside targets are then reported in ``skipped``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .delta import bias_delta, delta_weight, merged_weight
from .weights import AdapterWeights, ModuleWeights, resolve_target, target_shapes


def _roots(target: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    """(decoder, model root or None)."""
    decoder = getattr(target, "decoder", None)
    if isinstance(decoder, nn.Module):
        return decoder, target
    return target, None


def _plan(target: nn.Module, aw: AdapterWeights, check: bool) -> tuple[list, list[str]]:
    decoder, root = _roots(target)
    if check:
        aw.check_against(target_shapes(decoder))
    items, skipped = [], []
    for name, m in aw.modules.items():
        owner, attr = resolve_target(decoder, name)
        items.append((f"decoder.{name}", owner, attr, m))
    for name, m in aw.outside.items():
        if root is None:
            skipped.append(name)
            continue
        try:
            owner, attr = resolve_target(root, name)
        except KeyError:
            skipped.append(name)
            continue
        if getattr(owner, attr).is_meta:
            skipped.append(name)
            continue
        items.append((name, owner, attr, m))
    return items, skipped


@dataclass
class MergedAdapter:
    """Handle of a merge: ``unmerge()`` restores the exact original tensors."""

    adapter: AdapterWeights
    strength: float
    _saved: list = field(default_factory=list)  # (owner, attr, original tensor)
    skipped: list[str] = field(default_factory=list)
    active: bool = True

    def unmerge(self) -> None:
        if not self.active:
            return
        with torch.no_grad():
            for owner, attr, original in reversed(self._saved):
                getattr(owner, attr).copy_(original)
        self._saved.clear()
        self.active = False


def merge_adapter(target: nn.Module, aw: AdapterWeights, strength: float = 1.0, *, check: bool = True
                  ) -> MergedAdapter:
    """Merge ``aw`` into ``target``'s weights at ``strength`` (computed in fp32, stored in each weight's dtype)."""
    items, skipped = _plan(target, aw, check)
    handle = MergedAdapter(aw, strength, skipped=skipped)
    with torch.no_grad():
        try:
            for _, owner, attr, m in items:
                w = getattr(owner, attr)
                handle._saved.append((owner, attr, w.detach().clone()))
                w.copy_(merged_weight(m, w, strength).to(w.dtype))
                bias = getattr(owner, "bias", None) if attr == "weight" else None
                bd = bias_delta(m, bias, strength)
                if bd is not None:
                    handle._saved.append((owner, "bias", bias.detach().clone()))
                    bias.copy_((bias.float() + bd).to(bias.dtype))
        except BaseException:
            handle.unmerge()
            raise
    return handle


def unmerge_adapter(handle: MergedAdapter) -> None:
    handle.unmerge()


class AppliedAdapter:
    """An adapter applied without touching the base weights of linear layers: each adapted ``nn.Linear`` gets a
    forward hook adding ``x @ ΔWᵀ`` (low-rank for plain LoRA, a cached full delta otherwise). Targets that are not
    linear layers (norm weights, convolutions, raw parameters) are merged in place and restored on ``remove()``."""

    def __init__(self, target: nn.Module, aw: AdapterWeights, strength: float = 1.0, *, check: bool = True):
        self.adapter = aw
        self._strength = float(strength)
        self._hooks: list = []
        self._entries: list[tuple[nn.Linear, ModuleWeights]] = []
        self._cache: dict[int, torch.Tensor] = {}
        items, self.skipped = _plan(target, aw, check)
        in_place = []
        for name, owner, attr, m in items:
            if isinstance(owner, nn.Linear) and attr == "weight":
                self._entries.append((owner, m))
                self._hooks.append(owner.register_forward_hook(self._hook_for(owner, m)))
            else:
                in_place.append((name, owner, attr, m))
        self._merged: Optional[MergedAdapter] = None
        self._in_place = in_place
        self._merge_in_place()

    # ----- strength -----
    @property
    def strength(self) -> float:
        return self._strength

    def set_strength(self, strength: float) -> None:
        self._strength = float(strength)
        self._cache.clear()
        self._merge_in_place()

    def _merge_in_place(self) -> None:
        if self._merged is not None:
            self._merged.unmerge()
            self._merged = None
        if not self._in_place:
            return
        handle = MergedAdapter(self.adapter, self._strength)
        with torch.no_grad():
            for _, owner, attr, m in self._in_place:
                w = getattr(owner, attr)
                handle._saved.append((owner, attr, w.detach().clone()))
                w.copy_(merged_weight(m, w, self._strength).to(w.dtype))
        self._merged = handle

    # ----- hooks -----
    def _hook_for(self, layer: nn.Linear, m: ModuleWeights):
        low_rank = m.kind == "lora" and m.dora is None

        def hook(module, inputs, output):
            if self._strength == 0.0:
                return output
            x = inputs[0]
            if low_rank:
                down = m.tensors["down"].to(device=x.device, dtype=x.dtype)
                up = m.tensors["up"].to(device=x.device, dtype=x.dtype)
                extra = F.linear(F.linear(x, down), up) * (m.scale * self._strength)
            else:
                key = id(module)
                delta = self._cache.get(key)
                if delta is None or delta.device != x.device or delta.dtype != x.dtype:
                    delta = delta_weight(m, module.weight, self._strength).to(device=x.device, dtype=x.dtype)
                    self._cache[key] = delta
                extra = F.linear(x, delta)
            if m.bias_diff is not None and module.bias is not None:
                extra = extra + m.bias_diff.to(device=x.device, dtype=x.dtype) * self._strength
            return output + extra.to(output.dtype)

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._cache.clear()
        if self._merged is not None:
            self._merged.unmerge()
            self._merged = None

    def __enter__(self) -> "AppliedAdapter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_unmerged(target: nn.Module, aw: AdapterWeights, strength: float = 1.0, *, check: bool = True
                   ) -> AppliedAdapter:
    return AppliedAdapter(target, aw, strength, check=check)


def merged_state(target: nn.Module, aw: AdapterWeights, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """Merged fp32 weights of every adapted decoder target, without modifying the model (for checks and tests)."""
    decoder, _ = _roots(target)
    out = {}
    for name, m in aw.modules.items():
        owner, attr = resolve_target(decoder, name)
        out[name] = merged_weight(m, getattr(owner, attr), strength)
    return out
