"""How the frozen model is held on a device: base precision, quantization, layer offload and the memory plan.

Training calls two functions: ``load_frozen_base`` (plan, refuse or pick settings, then load the decoder at its
base precision with offloaded layers in host memory) and ``Holding.attach`` (after the adapter is added: move
trainable tensors to the device and start streaming the offloaded layers).

- ``quant``: ``QuantLinear`` (fp8 / int8 / nf4 storage, computed in the training dtype);
- ``load``: the decoder read tensor by tensor at a base precision, ComfyUI fp8 files included;
- ``offload``: ``LayerStreamer`` (host-resident layers copied in ahead of use on a side CUDA stream);
- ``plan``: peak device memory from config and file headers, measured on fake tensors; ``shapes``: the real 2B and
  XL architectures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .load import load_base
from .offload import LayerStreamer
from .quant import QuantLinear, keep_oft_rebuild

__all__ = ["Holding", "LayerStreamer", "QuantLinear", "check_compute_precision", "load_base", "load_frozen_base",
           "recompute_last_layer"]

Say = Callable[..., None]


def check_compute_precision(precision: str, device_type: str) -> None:
    """Refuse a compute precision the device cannot train in (training and ``sidestep plan`` say the same)."""
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("precision: fp16 needs a CUDA device; use bf16 or fp32")


def recompute_last_layer(fused_backward: bool, offload_layers: int, n_layers: int) -> bool:
    """Whether full checkpointing recomputes the decoder's last layer as well (``AceStepDiT.recompute_last``).

    Normally it does not: backward needs that layer's activations first, so recomputing them costs a forward
    (1/8 of a step's recomputation at the benchmark's 8 layers) for almost no peak memory (CPU-measured: 0 at 60 s,
    +1 % at 240 s). It does when every layer is streamed (a streamed layer's weights are not kept for backward) and
    with fused backward, whose peak the kept layer raises (the plan: +0.1 GiB at XL, where fused backward is what
    fits 3 GiB)."""
    return fused_backward or offload_layers >= n_layers


@dataclass
class Holding:
    """The device settings one run ended up with, and the streamer once attached."""

    base_precision: str
    offload_layers: int
    plan: Optional[object] = None  # plan.MemoryPlan
    fused_backward: bool = False  # the plan needs the optimizer step fused into backward (memory auto)
    streamer: Optional[LayerStreamer] = field(default=None, repr=False)

    def chosen(self, cfg) -> dict[str, Any]:
        """The ``TrainConfig`` device settings this run uses instead of ``cfg``'s (``memory auto`` or
        ``offload_layers auto`` picked them), as ``{field: value used}``; empty when it uses the requested ones."""
        used = {"base_precision": self.base_precision, "offload_layers": str(self.offload_layers),
                "fused_backward": cfg.fused_backward or self.fused_backward}
        return {k: v for k, v in used.items() if getattr(cfg, k) != v}

    def attach(self, adapter, device: torch.device, say: Optional[Say] = None) -> None:
        """After ``inject_adapter``: every trainable tensor on ``device``; offloaded layers start streaming."""
        keep_oft_rebuild(adapter)
        for p in adapter.parameters():
            if p.device != device:
                p.data = p.data.to(device)
        if adapter.network is not None:
            adapter.network.to(device)
        if not self.offload_layers:
            return
        decoder = adapter.module.decoder
        n_layers = len(decoder.layers)
        self.offload_layers = min(self.offload_layers, n_layers)
        needed = self.offload_layers / n_layers
        if decoder.checkpoint_ratio < needed:
            if say:
                say(f"offload: checkpointing the first {self.offload_layers} layers too (offloaded layers are "
                    "re-streamed in backward instead of being kept)", logging.INFO)
            decoder.checkpoint_ratio = needed
        self.streamer = LayerStreamer(list(decoder.layers[: self.offload_layers]), device)


def load_frozen_base(cfg, device: torch.device, dtype: torch.dtype, say: Optional[Say] = None):
    """Plan (and refuse or choose settings), then load ``decoder`` + ``null_condition_emb`` for training.

    Returns ``(LoadedModel, Holding)``."""
    from .plan import settle

    holding = settle(cfg, device, say)
    loaded = load_base(cfg.checkpoint, base_precision=holding.base_precision, dtype=dtype, device=device,
                       variant=cfg.base_variant or None, host_layers=range(holding.offload_layers))
    return loaded, holding

