"""Adapter training: objective, adapters (PEFT / LyCORIS), data, optimisers, checkpoints, logging and the loop."""

from .adapters import Adapter, AdapterMismatchError, find_adapter, inject_adapter, load_adapter_weights, read_adapter
from .loop import NonFiniteLossError, TrainResult, train

__all__ = [
    "Adapter", "AdapterMismatchError", "NonFiniteLossError", "TrainResult", "find_adapter", "inject_adapter",
    "load_adapter_weights", "read_adapter", "train",
]
