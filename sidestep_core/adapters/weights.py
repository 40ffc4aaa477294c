"""The common in-memory form of an adapter, whatever file it came from.

An :class:`AdapterWeights` holds one :class:`ModuleWeights` per adapted target. Targets inside the DiT are named as
in the decoder (``layers.3.self_attn.q_proj``, ``condition_embedder``, ``layers.0.mlp_norm``); a target names a module
whose ``.weight`` is patched, or, when no such module exists, a parameter itself (``scale_shift_table``).
Targets outside the decoder (ComfyUI's ``TrainLoraNode`` adapts the whole model) are kept in ``outside``, named from
the model root (``encoder.lyric_encoder.layers.0.self_attn.q_proj``), so re-exporting loses nothing.

Tensors use one canonical naming per kind (see :data:`KIND_TENSORS`); the scale of the additive delta is resolved
once, at reading time, from whatever the source stores (PEFT config, per-module ``alpha``, rsLoRA …), so the maths
in :mod:`.delta` never has to know where a file came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

# kind -> (required tensor names, optional tensor names)
KIND_TENSORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # ΔW = scale · up @ down                          up [out, r], down [r, in]
    "lora": (("up", "down"), ()),
    # ΔW = scale · kron(w1, w2); each side full ("w1") or low-rank ("w1_a" @ "w1_b"); t2 = Tucker core (conv only)
    "lokr": ((), ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")),
    # ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)  (t1/t2 = Tucker cores, conv only)
    "loha": (("w1_a", "w1_b", "w2_a", "w2_b"), ("t1", "t2")),
    # W' = rescale ⊙ blockdiag(Rᵀ) W, R = Cayley(blocks − blocksᵀ)   blocks [n, b, b], rescale [out, 1]
    "oft": (("blocks",), ("rescale",)),
    # ΔW = diff (a full delta of the parameter; also 1-D norm weights)
    "diff": (("diff",), ()),
    # only the bias changes (ComfyUI ``diff_b`` without a weight patch)
    "bias": ((), ()),
}
KINDS = tuple(KIND_TENSORS)
ADAPTER_TYPES = ("lora", "dora", "lokr", "loha", "oft")

# DoRA variants (how the magnitude vector is turned into the merged weight; see delta.py):
#   row_merged: W' = m ⊙ (W+ΔW) / ‖W+ΔW‖_row, m [out]      — PEFT use_dora, LyCORIS wd_on_out=True (trained maths)
#   row_base:   W' = d ⊙ (W+ΔW) / ‖W‖_row,    d [out, 1]   — what ComfyUI computes for an [out, 1] dora_scale
#   col_merged: W' = (W+ΔW) ⊙ d / ‖W+ΔW‖_col, d [1, in]    — LyCORIS wd_on_out=False; ComfyUI matches it exactly
DORA_MODES = ("row_merged", "row_base", "col_merged")


class AdapterFormatError(ValueError):
    """A file that is not an adapter we can read (message starts with the path)."""


class AdapterShapeError(ValueError):
    """An adapter made for another model: unknown targets or shapes that do not fit (message starts with the path)."""


@dataclass
class ModuleWeights:
    kind: str
    tensors: dict[str, torch.Tensor]
    scale: float = 1.0  # multiplier of the additive delta (lora/lokr/loha); 1.0 for oft/diff
    alpha: Optional[float] = None  # as stored by the source (kept for LyCORIS-style re-export)
    constraint: float = 0.0  # OFT: bound on ‖blocks − blocksᵀ‖_F (0 = none), in the units ComfyUI applies
    dora: Optional[torch.Tensor] = None
    dora_mode: Optional[str] = None
    bias_diff: Optional[torch.Tensor] = None  # full delta of the module's bias (ComfyUI ``diff_b``)

    def __post_init__(self) -> None:
        if self.kind not in KIND_TENSORS:
            raise ValueError(f"unknown adapter module kind {self.kind!r}")
        if (self.dora is None) != (self.dora_mode is None):
            raise ValueError("dora and dora_mode go together")
        if self.dora_mode is not None and self.dora_mode not in DORA_MODES:
            raise ValueError(f"unknown DoRA mode {self.dora_mode!r}")

    # ----- shapes -----
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the parameter this module patches, as implied by its tensors."""
        t = self.tensors
        if self.kind == "lora":
            return (t["up"].shape[0], t["down"].shape[1])
        if self.kind == "loha":
            return (t["w1_a"].shape[0], t["w1_b"].shape[1])
        if self.kind == "lokr":
            a, b = _factor_shape(t, "w1")
            c, d = _factor_shape(t, "w2")
            kernel = tuple(t["w2"].shape[2:]) if "w2" in t else ()
            return (a * c, b * d, *kernel)
        if self.kind == "oft":
            n, bs, _ = t["blocks"].shape
            return (n * bs, -1)  # the input width is free
        if self.kind == "bias":
            return (int(self.bias_diff.numel()), -1)
        return tuple(t["diff"].shape)

    def rank(self) -> Optional[int]:
        t = self.tensors
        if self.kind == "lora":
            return int(t["down"].shape[0])
        if self.kind == "loha":
            return int(t["w1_b"].shape[0])
        if self.kind == "lokr":
            for name in ("w2_b", "w1_b"):
                if name in t:
                    return int(t[name].shape[0])
        if self.kind == "oft":
            return int(t["blocks"].shape[1])  # block size
        return None

    def check_tensors(self, where: str) -> None:
        required, optional = KIND_TENSORS[self.kind]
        missing = [n for n in required if n not in self.tensors]
        unknown = [n for n in self.tensors if n not in required + optional]
        if self.kind == "lokr":
            for side in ("w1", "w2"):
                if side not in self.tensors and not (f"{side}_a" in self.tensors and f"{side}_b" in self.tensors):
                    missing.append(f"{side} (or {side}_a + {side}_b)")
        if missing or unknown:
            raise AdapterFormatError(
                f"{where}: incomplete {self.kind} module"
                + (f", missing {', '.join(missing)}" if missing else "")
                + (f", unexpected {', '.join(unknown)}" if unknown else "")
            )
        if self.kind == "oft":
            b = self.tensors["blocks"]
            if b.ndim != 3 or b.shape[1] != b.shape[2]:
                raise AdapterFormatError(f"{where}: OFT blocks must be [n, b, b], got {tuple(b.shape)}")
        self._check_values(where)

    def _check_values(self, where: str) -> None:
        """Refuse what would fail or poison the maths later (a hand-edited, truncated-and-padded or foreign file):
        empty tensors, factors that do not multiply (the module's own maths run on shapes alone), NaN/Inf."""
        from .delta import additive_delta

        named = {**self.tensors, "dora": self.dora, "bias": self.bias_diff}
        for name, t in named.items():
            if t is None:
                continue
            if t.numel() == 0:
                raise AdapterFormatError(f"{where}: {name} is empty (shape {tuple(t.shape)})")
            if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):  # fp8 has no isfinite
                raise AdapterFormatError(f"{where}: {name} holds NaN or infinite values")
        if self.kind in ("lora", "lokr", "loha"):
            shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
            try:
                additive_delta(self.to(device="meta"), (-1,), device="meta")
            except (RuntimeError, IndexError, ValueError) as exc:
                raise AdapterFormatError(f"{where}: the {self.kind} factors do not fit together ({shapes})") from exc

    def to(self, dtype: Optional[torch.dtype] = None, device=None) -> "ModuleWeights":
        def cv(x):
            return None if x is None else x.to(device=device, dtype=dtype if x.is_floating_point() else None)

        return ModuleWeights(self.kind, {k: cv(v) for k, v in self.tensors.items()}, self.scale, self.alpha,
                             self.constraint, cv(self.dora), self.dora_mode, cv(self.bias_diff))

    @property
    def is_dora(self) -> bool:
        return self.dora is not None


def _factor_shape(t: Mapping[str, torch.Tensor], side: str) -> tuple[int, int]:
    if side in t:
        return int(t[side].shape[0]), int(t[side].shape[1])
    return int(t[f"{side}_a"].shape[0]), int(t[f"{side}_b"].shape[1])


@dataclass
class AdapterWeights:
    """One adapter in memory. ``modules`` in decoder naming; ``outside`` for targets outside the decoder."""

    modules: dict[str, ModuleWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""
    format: str = ""  # peft | lycoris | comfyui
    outside: dict[str, ModuleWeights] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # things the reader had to assume (shown by the CLI)

    # ----- description -----
    @property
    def adapter_type(self) -> str:
        """lora | dora | lokr | loha | oft | diff | mixed — from the tensors, not from what the metadata claims."""
        kinds = set()
        for m in self.all_modules().values():
            kinds.add("dora" if (m.kind == "lora" and m.is_dora) else m.kind)
        if not kinds:
            return "empty"
        if len(kinds) == 1:
            return kinds.pop()
        main = kinds - {"diff"}
        return main.pop() if len(main) == 1 else "mixed"

    def all_modules(self) -> dict[str, ModuleWeights]:
        out = {f"decoder.{k}": v for k, v in self.modules.items()}
        out.update(self.outside)
        return out

    def targets(self) -> list[str]:
        return list(self.modules)

    def meta_value(self, key: str, default: Any = None) -> Any:
        """A ``sidestep_*`` metadata value decoded from its JSON string (plain strings stay strings)."""
        if key not in self.metadata:
            return default
        raw = self.metadata[key]
        try:
            return json.loads(raw)
        except (TypeError, ValueError):
            return raw

    def num_parameters(self) -> int:
        n = 0
        for m in self.all_modules().values():
            n += sum(t.numel() for t in m.tensors.values())
            n += 0 if m.dora is None else m.dora.numel()
            n += 0 if m.bias_diff is None else m.bias_diff.numel()
        return n

    def summary(self) -> str:
        ranks = sorted({m.rank() for m in self.modules.values() if m.rank() is not None})
        parts = [f"{self.adapter_type} adapter from {self.format or 'unknown'} file {self.source}",
                 f"{len(self.modules)} decoder targets"]
        if self.outside:
            parts.append(f"{len(self.outside)} targets outside the decoder")
        if ranks:
            parts.append("rank " + ("/".join(map(str, ranks)) if len(ranks) <= 4 else f"{ranks[0]}–{ranks[-1]}"))
        variant = self.meta_value("sidestep_base_variant")
        if variant:
            parts.append(f"trained on {variant}")
        return ", ".join(parts)

    # ----- fitting a model -----
    def check_against(self, shapes: Mapping[str, tuple[int, ...]], outside_shapes: Optional[Mapping] = None,
                      *, limit: int = 5) -> None:
        """Raise :class:`AdapterShapeError` unless every target exists with a fitting shape.

        ``shapes`` maps decoder target names to parameter shapes (see :func:`target_shapes`); ``outside_shapes`` the
        same for the rest of the model (None: outside targets are not checked).
        """
        unknown, wrong = [], []
        groups = [(self.modules, shapes, "")]
        if outside_shapes is not None:
            groups.append((self.outside, outside_shapes, ""))
        for mods, table, _ in groups:
            for name, m in mods.items():
                if name not in table:
                    unknown.append(name)
                    continue
                want = tuple(table[name])
                got = m.weight_shape()
                fits = (len(got) == len(want) and all(g in (-1, w) for g, w in zip(got, want))) or (
                    m.kind == "diff" and m.tensors["diff"].numel() == math.prod(want))
                if m.kind in ("oft", "bias"):
                    fits = len(want) >= 2 and got[0] == want[0]
                elif m.kind in ("lora", "lokr", "loha") and len(want) > 2:  # conv weights flatten their kernel
                    fits = got[0] == want[0] and math.prod(got[1:]) == math.prod(want[1:])
                if not fits:
                    wrong.append(f"{name}: adapter {_fmt(got)} vs model {_fmt(want)}")
                elif m.dora is not None and m.dora.numel() not in (want[0], math.prod(want[1:])):
                    wrong.append(f"{name}: DoRA magnitude of {m.dora.numel()} values vs weight {_fmt(want)}")
        if unknown or wrong:
            total = len(self.modules) + len(self.outside)
            parts = []
            if unknown:
                parts.append(f"{len(unknown)} target(s) the model does not have, first: {', '.join(unknown[:limit])}")
            if wrong:
                parts.append(f"{len(wrong)} shape mismatch(es), first: {'; '.join(wrong[:limit])}")
            raise AdapterShapeError(
                f"{self.source or 'adapter'}: made for another model — {len(unknown) + len(wrong)} of {total} "
                f"adapted modules do not fit this ACE-Step 1.5 model: " + " | ".join(parts)
            )

    def check_decoder(self, decoder: nn.Module) -> None:
        self.check_against(target_shapes(decoder))


def _fmt(shape: Iterable[int]) -> str:
    return "[" + ", ".join("*" if s == -1 else str(s) for s in shape) + "]"


def target_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Target name -> patched parameter shape for every parameter of ``module`` (``x.weight`` is target ``x``)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, p in module.named_parameters():
        if name.endswith(".weight"):
            out[name[: -len(".weight")]] = tuple(p.shape)
        elif not name.endswith(".bias"):
            out[name] = tuple(p.shape)
    return out


def resolve_target(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(owner module, parameter attribute) patched by target ``name`` under ``root``."""
    try:
        mod = root.get_submodule(name)
        if isinstance(getattr(mod, "weight", None), torch.Tensor):
            return mod, "weight"
    except AttributeError:
        pass
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = root.get_submodule(owner_name) if owner_name else root
    except AttributeError as exc:
        raise KeyError(name) from exc
    if not isinstance(getattr(owner, attr, None), torch.Tensor):
        raise KeyError(name)
    return owner, attr
