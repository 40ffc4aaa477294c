"""Exponential moving average of the adapter weights, saved as a second adapter beside every checkpoint.

The average lives in fp32 copies of the trainable parameters, on their device. Until
``ema_start_step`` it simply follows the weights; from then on ``ema = decay * ema + (1 - decay) * weights`` after
every optimizer step. It is saved by writing the adapter with the averaged weights swapped in (so ``ema/`` is an
ordinary adapter folder in the same format as its checkpoint) and stored in the training state for exact resume.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch

from ..config import TrainConfig
from .adapters import Adapter

EMA_DIR = "ema"


class EMAStateError(ValueError):
    """A checkpoint's EMA state does not fit the adapter being trained (message starts with the path)."""


class EMA:
    def __init__(self, adapter: Adapter, decay: float, start_step: int):
        self.adapter, self.decay, self.start_step = adapter, float(decay), int(start_step)
        self.shadow = {n: p.detach().float().clone() for n, p in adapter.named_parameters()}

    @classmethod
    def for_config(cls, adapter: Adapter, cfg: TrainConfig) -> Optional["EMA"]:
        return cls(adapter, cfg.ema_decay, cfg.ema_start_step) if cfg.ema_decay > 0 else None

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based)."""
        follow = step <= self.start_step
        for n, p in self.adapter.named_parameters():
            s = self.shadow[n]
            if follow:
                s.copy_(p.detach())
            else:
                s.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The adapter holds the averaged weights inside the block and exactly its own weights again after."""
        params = dict(self.adapter.named_parameters())
        live = {n: p.detach().clone() for n, p in params.items()}
        try:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self.shadow[n])
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(live[n])

    def save(self, folder: Path, metadata: Mapping[str, str]) -> None:
        """Write the averaged adapter into ``folder/ema`` (``folder`` is a checkpoint or ``final/`` being written)."""
        meta = {**metadata, "sidestep_ema_decay": str(self.decay), "sidestep_ema_start_step": str(self.start_step)}
        with self.swapped_in():
            self.adapter.save(Path(folder) / EMA_DIR, meta)

    # ----- training state -----
    def state(self) -> dict[str, Any]:
        return {"decay": self.decay, "start_step": self.start_step, "shadow": dict(self.shadow)}

    def load_state(self, saved: Optional[dict[str, Any]], source: str) -> bool:
        """Restore from a checkpoint's state; False (nothing changed) when the checkpoint has no EMA."""
        if not saved:
            return False
        shadow = saved["shadow"]
        if set(shadow) != set(self.shadow) or any(shadow[n].shape != s.shape for n, s in self.shadow.items()):
            raise EMAStateError(f"{source}: the EMA weights stored in the checkpoint do not fit this adapter")
        for n, s in self.shadow.items():
            s.copy_(shadow[n])
        return True
