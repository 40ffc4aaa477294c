"""The next micro-batch is read (and pinned, for CUDA) in a background thread while the current step runs.

Only reading happens ahead: which batch comes next is still decided by the training loop, and a prediction that
turns out wrong (or a batch never asked for) just means a synchronous load, so resume and determinism are unaffected.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch

from .data import Batch, Item, LatentDataset, load_batch


class Prefetcher:
    def __init__(self, dataset: LatentDataset, device: torch.device):
        self.dataset, self.device = dataset, device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidestep-prefetch")
        self._pending: Optional[tuple[list[Item], Future]] = None

    def _read(self, items: list[Item]) -> Batch:
        batch = load_batch(self.dataset, items)
        return batch.pin_memory() if self.device.type == "cuda" else batch

    def prefetch(self, items: Optional[list[Item]]) -> None:
        """Start reading ``items`` (the batch expected next); None forgets any pending read."""
        self._pending = (list(items), self._pool.submit(self._read, list(items))) if items else None

    def get(self, items: list[Item]) -> Batch:
        """The batch of ``items`` on the device: the prefetched one when it is the one asked for."""
        pending, self._pending = self._pending, None
        batch = pending[1].result() if pending is not None and pending[0] == list(items) else self._read(items)
        return batch.to(self.device)

    def close(self) -> None:
        self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)
