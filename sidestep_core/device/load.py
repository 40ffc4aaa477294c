"""Load the frozen decoder for training at a base precision, tensor by tensor, straight to where it will live.

The checkpoint is opened through ``model.loading`` (which also reads ``null_condition_emb`` and describes the
model); the decoder is filled here, one tensor at a time, so nothing is ever held as a second full copy:

- the layer projections (the adapter candidates) and the large frozen linears outside the layers
  (``OTHER_QUANTIZED``) become ``QuantLinear`` at fp8 / int8 / nf4, or stay ``nn.Linear`` at bf16 (in the training
  dtype);
- ComfyUI fp8 files (``float8_e4m3fn`` weights, optionally with ``scaled_fp8`` + ``*.scale_weight`` or
  ``*.weight_scale`` + ``*.comfy_quant``) are read as they are: at fp8 the stored bytes and scale are kept, at any
  other precision each tensor is dequantized on its own;
- layers in ``host_layers`` (offloaded) are placed in host memory, pinned when the device is CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from ..model.loading import LoadedModel, check_architecture, load_acestep
from .quant import BASE_PRECISIONS, FP8, QuantLinear

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Per-tensor side data of quantized checkpoints (ComfyUI's old "scaled_fp8" and new "comfy_quant" conventions).
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
IGNORED_SUFFIXES = (".comfy_quant", ".scale_input", ".input_scale")
# Linears outside the layers quantized with the projections: each timestep MLP's modulation projection (6 vectors
# for every layer; 79 M of XL's weights) and the condition projection (the cross-attention context, which the
# quantized k/v projections read next). Kept in the training dtype: the timestep MLPs' first two linears (14 M at
# XL): the second's output also modulates the output norm directly, and quantizing it moved a short nf4 run's loss
# by up to 5 % on the tiny model (tests/test_device_precision.py; 2 % with the others quantized); the patch
# convolutions in and out (1.3 M; proj_out writes the prediction itself, which quantization practice keeps), norms,
# biases and the modulation tables.
OTHER_QUANTIZED = ("time_embed.time_proj", "time_embed_r.time_proj", "condition_embedder")


def projection_names(decoder: nn.Module) -> list[str]:
    """Decoder-relative names of every layer projection (what is quantized, and what adapters may target)."""
    return [n for n, m in decoder.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("layers.") and n.rsplit(".", 1)[-1] in PROJECTIONS]


def quantized_names(decoder: nn.Module) -> list[str]:
    """Decoder-relative names of every linear stored quantized at a base precision other than bf16."""
    return projection_names(decoder) + [n for n in OTHER_QUANTIZED if isinstance(decoder.get_submodule(n), nn.Linear)]


def _layer_index(name: str) -> Optional[int]:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit() else None


def _scale_for(src, key: str) -> Optional[torch.Tensor]:
    """The stored scale of weight ``key`` (``….weight``), if the file has one."""
    base = key[: -len(".weight")]
    for suffix in WEIGHT_SCALE_SUFFIXES:
        if base + suffix in src.shapes:
            return src.get(base + suffix)
    return None


def _read(src, key: str, dtype: torch.dtype) -> torch.Tensor:
    """A tensor in ``dtype`` (floats only), with a stored fp8 weight multiplied by its scale first."""
    t = src.get(key)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        scale = _scale_for(src, key) if key.endswith(".weight") else None
        t = t.float() if scale is None else t.float() * scale.float().reshape(-1, *([1] * (t.ndim - 1)))
    return t.to(dtype) if t.is_floating_point() else t


def load_base(
    path: str | Path,
    *,
    base_precision: str = "bf16",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    variant: Optional[str] = None,
    host_layers: Iterable[int] = (),
) -> LoadedModel:
    """``decoder`` + ``null_condition_emb`` ready for training (frozen, eval mode); other parts stay on meta."""
    if base_precision not in BASE_PRECISIONS:
        raise ValueError(f"base_precision: must be one of {', '.join(BASE_PRECISIONS)} (got {base_precision!r})")
    device = torch.device(device)
    loaded = load_acestep(path, variant=variant, dtype=dtype, device=device, parts={"null_condition_emb"})
    src, decoder = loaded.source, loaded.model.decoder
    host = set(host_layers)
    pin = device.type == "cuda"

    def place(t: torch.Tensor, name: str) -> torch.Tensor:
        if _layer_index(name) in host:
            t = t.to("cpu")
            return t.pin_memory() if pin else t
        return t.to(device)

    _check_decoder_keys(decoder, src, Path(path))
    quantized = set(quantized_names(decoder)) if base_precision != "bf16" else set()
    for name in sorted(quantized):
        key = f"decoder.{name}.weight"
        raw = src.get(key)
        lin = decoder.get_submodule(name)
        bias = _read(src, f"decoder.{name}.bias", dtype) if lin.bias is not None else None
        if base_precision == "fp8" and raw.dtype == FP8:
            q = QuantLinear.from_fp8(raw, _scale_for(src, key), bias, dtype)
        else:
            q = QuantLinear.quantize(_read(src, key, dtype).to(device), bias, base_precision, dtype)
        for buf_name, buf in q.named_buffers(recurse=False):
            setattr(q, buf_name, place(buf, name))
        owner, _, attr = name.rpartition(".")
        setattr(decoder.get_submodule(owner), attr, q)

    state = {}
    for key in decoder.state_dict():
        if key.rsplit(".", 1)[0] in quantized:
            continue  # a QuantLinear's buffers, filled above
        state[key] = place(_read(src, "decoder." + key, dtype), key)
    decoder.load_state_dict(state, strict=False, assign=True)
    for mod_name, module in decoder.named_modules():  # derived buffers (RoPE inv_freq) are built on CPU
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta and f"{mod_name}.{name}".lstrip(".") not in state \
                    and not isinstance(module, QuantLinear):
                module._buffers[name] = buf.to(device)
    decoder.eval().requires_grad_(False)
    return loaded


def _check_decoder_keys(decoder: nn.Module, src, path: Path) -> None:
    expected = {"decoder." + k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    present = {k: s for k, s in src.shapes.items() if k.startswith("decoder.")
               and not k.endswith(WEIGHT_SCALE_SUFFIXES + IGNORED_SUFFIXES)}
    check_architecture(path, src.prefix, expected, present)

