"""Measured peaks of real steps, to check the plan against: CUDA's allocator statistics, or on CPU the allocation
events of torch's profiler (every allocation and free the CPU allocator reports, in order)."""

from __future__ import annotations

from typing import Callable

import torch


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes allocated while ``fn`` runs and not yet freed (tensors that existed before do not count)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag.name == "Allocation":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, nbytes in sorted(events):
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
