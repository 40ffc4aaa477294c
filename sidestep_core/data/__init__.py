"""Datasets: metadata (dataset JSON, sidecars), discovery, preprocessing and the tensor cache."""

from .cache import Sample, load_dataset

__all__ = ["Sample", "load_dataset"]
