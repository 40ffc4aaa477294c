"""Bake adapters into a copy of the base model: one ComfyUI diffusion-model file (the DiT single-file layout that
``UNETLoader`` / ``comfy.sd.load_diffusion_model`` loads: the DiT's own tensor names, no prefix).

Every adapter type is baked through :func:`.delta.merged_weight` — our forward-checked maths, not LyCORIS's
``merge_to`` / ``get_diff_weight`` (LyCORIS 4.1.3 applies alpha/rank twice there for LoKr and LoHa). The adapters
are applied in the order given, each at its strength to the weights the previous one left — what a chain of
ComfyUI LoRA loaders does — in fp32, and each tensor is stored in the base file's dtype (rounded once, at the end).

The file is written tensor by tensor (read from the memory-mapped base, patched, written, dropped), so memory stays
at about one weight tensor; it goes to a temporary file beside the destination and is renamed into place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .. import __version__
from ..fsutil import atomic_write_stream
from .delta import merged_weight
from .weights import AdapterShapeError, AdapterWeights, ModuleWeights

# safetensors dtype names
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass
class BakeResult:
    path: Path
    patched: int  # tensors changed
    tensors: int  # tensors written
    notes: list[str] = field(default_factory=list)


def _shapes_of(keys: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    """Target name -> shape, like :func:`.weights.target_shapes`, for the keys under ``prefix``."""
    out = {}
    for k, s in keys.items():
        if not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        if name.endswith(".weight"):
            out[name[: -len(".weight")]] = s
        elif not name.endswith(".bias"):
            out[name] = s
    return out


def _plan(shapes: dict[str, tuple[int, ...]], sources: Sequence[tuple[AdapterWeights, float]]
          ) -> dict[str, list[tuple[str, ModuleWeights, float]]]:
    """Tensor key -> [("weight" | "bias", module, strength)] in the order the adapters are applied."""
    decoder = _shapes_of(shapes, "decoder.")
    root = {k: v for k, v in _shapes_of(shapes, "").items() if not k.startswith("decoder.")}
    plan: dict[str, list] = {}
    for aw, strength in sources:
        aw.check_against(decoder, root)
        for prefix, mods in (("decoder.", aw.modules), ("", aw.outside)):
            for name, m in mods.items():
                key = f"{prefix}{name}.weight" if f"{prefix}{name}.weight" in shapes else f"{prefix}{name}"
                if m.kind != "bias":
                    plan.setdefault(key, []).append(("weight", m, float(strength)))
                if m.bias_diff is not None:
                    bias_key = f"{prefix}{name}.bias"
                    if bias_key not in shapes:
                        raise AdapterShapeError(f"{aw.source or 'adapter'}: {name} changes a bias the model does "
                                                "not have")
                    plan.setdefault(bias_key, []).append(("bias", m, float(strength)))
    return plan


def _patched(t: torch.Tensor, steps: list[tuple[str, ModuleWeights, float]]) -> torch.Tensor:
    w = t.float()
    for what, m, strength in steps:
        if what == "weight":
            w = merged_weight(m, w, strength)
        else:
            w = w + strength * m.bias_diff.float().reshape(w.shape)
    return w.to(t.dtype)


def _write_streamed(dest: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                    produce: Callable[[str], torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file whose tensors are made one at a time by ``produce`` (the header is known up front)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        size = torch.Size(shape).numel() * _DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it

    def fill(fh) -> None:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for name, dtype, shape in entries:
            t = produce(name)
            if t.dtype != _DTYPES[dtype] or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{name}: produced {t.dtype} {tuple(t.shape)}, header says {dtype} {shape}")
            fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())

    atomic_write_stream(dest, fill)


def bake(base: str | Path, sources: Sequence[tuple[AdapterWeights, float]], out_path: str | Path, *,
         progress: Optional[Callable[[int, int], None]] = None) -> BakeResult:
    """Write ``base``'s DiT with the ``(adapter, strength)`` pairs applied in order to ``out_path``.

    ``base``: any model ``load_acestep`` reads (a ComfyUI diffusion-model file, an all-in-one checkpoint — its DiT
    part is taken —, an original ACE-Step folder). Tensor names, order and dtypes are kept."""
    from ..model.loading import open_source, read_header

    base = Path(base).expanduser()
    out_path = Path(out_path).expanduser()
    if out_path.resolve() == base.resolve():
        raise ValueError(f"{out_path}: the baked model would replace its own base; choose another name")
    if not sources:
        raise ValueError("nothing to bake: give at least one adapter")
    src, config, layout, files = open_source(base)
    plan = _plan(src.shapes, sources)
    headers = {p: read_header(p) for p in set(src.files.values())}
    entries = []
    for key in src.keys():
        info = headers[src.files[key]][src.prefix + key]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{src.files[key]}: tensor {key} has dtype {info['dtype']}, which cannot be baked")
        entries.append((info["dtype"], tuple(info["data_offsets"]), src.files[key], key, tuple(info["shape"])))
    entries.sort(key=lambda e: (str(e[2]), e[1]))  # read each file front to back
    meta = {k: v for k, v in src.metadata.items() if isinstance(v, str)}
    if config is not None and "config" not in meta:
        meta["config"] = json.dumps(config.to_dict())
    meta.update({
        "format": "pt",
        "sidestep_baked": json.dumps([{"source": Path(aw.source).name if aw.source else "", "strength": float(s),
                                       "type": aw.adapter_type} for aw, s in sources]),
        "sidestep_baked_base": base.name,
        "sidestep_version": __version__,
    })
    done = [0]

    def produce(key: str) -> torch.Tensor:
        t = src.get(key)
        done[0] += 1
        if progress is not None:
            progress(done[0], len(entries))
        return _patched(t, plan[key]) if key in plan else t

    _write_streamed(out_path, [(k, dt, shape) for dt, _, _, k, shape in entries], produce, meta)
    notes = []
    if layout == "comfyui-aio":
        notes.append("only the diffusion model of the all-in-one checkpoint is written (load the text encoder "
                     "and VAE from their own files)")
    if any(dt.startswith("F8") for dt, *_ in entries):
        notes.append("fp8 weights are rounded to nearest (ComfyUI's own patcher rounds fp8 stochastically)")
    return BakeResult(out_path, len(plan), len(entries), notes)
