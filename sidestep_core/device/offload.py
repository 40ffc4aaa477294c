"""Layer offload: frozen decoder layers live in host memory and are copied to the device just ahead of use.

``LayerStreamer`` keeps every frozen tensor (parameters without grad, buffers) of the chosen layers in host memory
(pinned on CUDA) and installs device copies in the modules only while a layer runs: a forward pre-hook installs the
layer's copy (waiting for its transfer) and starts the transfer of the next layer in the direction of travel on a side
CUDA stream; a forward post-hook puts the host tensors back. Anything autograd saved keeps its device copy alive until
backward has used it, so results are exact whatever the schedule; memory is saved where those layers run under
activation checkpointing (then backward re-runs the layer's forward, and the hooks stream it in again, now in
descending order). Trainable adapter tensors inside the layers are never moved.

On CPU the same code path runs with real copies between host tensors, so the tests check it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes


@dataclass
class _Slot:
    module: nn.Module
    is_param: bool
    name: str
    host: torch.Tensor


@dataclass
class _Transfer:
    tensors: list[torch.Tensor]
    event: Optional[object] = None  # torch.cuda.Event on CUDA


@dataclass
class LayerStreamer:
    layers: list[nn.Module]
    device: torch.device
    ahead: int = 1
    slots: list[list[_Slot]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pending: dict[int, _Transfer] = {}
        self.last = -1
        self.installed: set[int] = set()
        self.transfers = 0  # layer copies started (forward, and backward's re-runs)
        self.handles = []
        for i, layer in enumerate(self.layers):
            slots = []
            for module in layer.modules():
                for name, p in module._parameters.items():
                    if p is not None and not p.requires_grad:
                        slots.append(_Slot(module, True, name, self._to_host(p.detach())))
                for name, b in module._buffers.items():
                    if b is not None:
                        slots.append(_Slot(module, False, name, self._to_host(b)))
            self.slots.append(slots)
            self._evict(i)
            self.handles.append(layer.register_forward_pre_hook(self._make_pre(i)))
            self.handles.append(layer.register_forward_hook(self._make_post(i)))

    # ----- moving -----
    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to("cpu")
        return t.pin_memory() if self.cuda and not t.is_pinned() else t

    def _install(self, i: int, tensors: list[torch.Tensor]) -> None:
        for slot, t in zip(self.slots[i], tensors):
            if slot.is_param:
                slot.module._parameters[slot.name] = nn.Parameter(t, requires_grad=False)
            else:
                slot.module._buffers[slot.name] = t

    def _evict(self, i: int) -> None:
        self._install(i, [s.host for s in self.slots[i]])
        self.installed.discard(i)

    def _fetch(self, i: int) -> None:
        if i in self.pending or not 0 <= i < len(self.layers):
            return
        hosts = [s.host for s in self.slots[i]]
        self.transfers += 1
        if not self.cuda:
            self.pending[i] = _Transfer([h.to(self.device, copy=True) for h in hosts])
            return
        with torch.cuda.stream(self.stream):
            tensors = [h.to(self.device, non_blocking=True) for h in hosts]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[i] = _Transfer(tensors, event)

    # ----- hooks -----
    def _make_pre(self, i: int):
        def pre(module, args):
            # Outside any dispatch mode around the layer: selective checkpointing replays a layer's ops by their
            # count, and its re-run in backward copies other layers than its forward did (prefetch runs the other
            # way), so it would refuse the re-run. The copies are no computation of the layer. (Compiled, the
            # hooks are traced as they are.)
            with contextlib.nullcontext() if torch.compiler.is_compiling() else _disable_current_modes():
                self._stream_in(i)
        return pre

    def _stream_in(self, i: int) -> None:
        if i > self.last:
            step = 1
        elif i < self.last:
            step = -1
        else:  # the same layer again: backward's re-run of the last one, or a new forward from layer 0
            step = 1 if i == 0 else -1
        self.last = i
        # Backward's re-run of a checkpointed layer may stop before the layer returns (no post-hook then).
        for j in list(self.installed):
            self._evict(j)
        self._fetch(i)
        transfer = self.pending.pop(i)
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(transfer.event)
            for t in transfer.tensors:  # freed only after the compute stream is done with them
                t.record_stream(current)
        self._install(i, transfer.tensors)
        self.installed.add(i)
        for k in range(1, self.ahead + 1):
            self._fetch(i + step * k)

    def _make_post(self, i: int):
        def post(module, args, output):
            self._evict(i)
        return post

    def host_bytes(self) -> int:
        return sum(s.host.numel() * s.host.element_size() for slots in self.slots for s in slots)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.pending.clear()
