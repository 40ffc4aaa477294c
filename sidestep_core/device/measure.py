"""Measured peaks of real steps, to check the plan against: CUDA's allocator statistics, or on CPU the allocation
events of torch's profiler (every allocation and free the CPU allocator reports, in order); and the real training
step they measure, on a decoder with random weights (the plan test and ``bench/real_scale.py`` share it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes allocated while ``fn`` runs and not yet freed (tensors that existed before do not count).

    A free is counted only when its block was allocated inside this window: the CPU allocator's profiler reporter
    keeps the sizes of blocks it saw in earlier profiling sessions even after they were freed unprofiled, so a later
    free of another block at a reused address is reported with a stale size (a peak lowered by whatever ran before
    in the process, and by when Python's garbage collector happened to run)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag.name == "Allocation":
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
    live = peak = 0
    blocks: dict[int, int] = {}
    for _, nbytes, ptr in sorted(events):
        if nbytes > 0:
            blocks[ptr] = nbytes
        elif blocks.pop(ptr, None) is None:
            continue  # a block from before the window
        live += nbytes
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """``torch.cuda.max_memory_allocated`` over ``fn`` (everything allocated on the device, before included)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors``."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr(), st.device] = st.nbytes()
    return sum(seen.values())


@dataclass
class RandomStep:
    """One training step as training runs it (frozen decoder at a base precision, adapter, optimizer, autocast,
    checkpointing, ``fused_backward``), on random weights and inputs: ``step()`` is forward + backward (with the
    optimizer steps inside it when fused), ``update()`` adds the optimizer step."""

    adapter: object  # training.adapters.Adapter
    optimizer: torch.optim.Optimizer
    inputs: dict
    target: torch.Tensor
    device: torch.device
    streamer: object = None  # offload.LayerStreamer when layers are offloaded
    fused: object = None  # training.fused.FusedBackward with cfg.fused_backward

    @classmethod
    def build(cls, config, cfg, base_precision: str, frames: int, cond_tokens: int,
              device: torch.device = torch.device("cpu"), offload_layers: int = 0) -> "RandomStep":
        from ..model.dit import AceStepDiT
        from ..training.adapters import inject_adapter
        from ..training.fused import FusedBackward
        from ..training.optim import build_optimizer
        from . import recompute_last_layer
        from .load import quantized_names
        from .offload import LayerStreamer
        from .quant import keep_oft_rebuild, quantize_module_linears

        device = torch.device(device)
        dtype = torch.bfloat16
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # the frozen base in the training dtype, as the loader leaves it
        try:
            with device:  # random init where it runs: initialising XL on the host takes minutes
                decoder = AceStepDiT(config)
        finally:
            torch.set_default_dtype(default)
        decoder.requires_grad_(False)
        if base_precision != "bf16":
            quantize_module_linears(decoder, base_precision, quantized_names(decoder), dtype)
        adapter = inject_adapter(decoder, cfg)
        keep_oft_rebuild(adapter)
        n = config.num_hidden_layers
        decoder.checkpoint_ratio = max(cfg.checkpointing_ratio if cfg.gradient_checkpointing else 0.0,
                                       offload_layers / n)
        decoder.recompute_last = recompute_last_layer(cfg.fused_backward, offload_layers, n)
        streamer = LayerStreamer(list(decoder.layers[:offload_layers]), device) if offload_layers else None
        adapter.module.train()
        g = torch.Generator().manual_seed(1)
        b, audio = cfg.batch_size, config.audio_acoustic_hidden_dim
        x = torch.randn(b, frames, audio, generator=g).to(device)
        inputs = dict(hidden_states=x,
                      context_latents=torch.randn(b, frames, config.in_channels - audio, generator=g).to(device),
                      encoder_hidden_states=torch.randn(b, cond_tokens, config.enc_hidden, generator=g).to(device))
        t = torch.full((b,), 0.5, dtype=dtype, device=device)
        inputs.update(timestep=t, timestep_r=t)
        optimizer = build_optimizer(adapter.parameters(), cfg)
        fused = FusedBackward(adapter.parameters(), optimizer, cfg.max_grad_norm) if cfg.fused_backward else None
        return cls(adapter, optimizer, inputs, x, device, streamer, fused)

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            pred = self.adapter.module(**self.inputs)
        (pred.float() - self.target).square().mean().backward()

    def update(self) -> None:
        self.step()
        if self.fused is None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def resident_bytes(self) -> int:
        """The decoder's parameters and buffers on the device (frozen base and adapter) and the optimizer state
        (after a first ``update``)."""
        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        mine = [t for t in (*self.adapter.module.parameters(), *self.adapter.module.buffers())
                if t.device.type == self.device.type]
        return tensor_bytes([*mine, *state])

    def peak_bytes(self) -> int:
        """Measured peak of a step: on CUDA ``max_memory_allocated``; on CPU the resident tensors plus the peak of
        what the step allocates."""
        if self.device.type == "cuda":
            return cuda_peak_bytes(self.step, self.device)
        return self.resident_bytes() + cpu_peak_bytes(self.step)
