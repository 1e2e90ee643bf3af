"""Readers and validation of prediction tables, tabular files and bundles; no torch, no store."""

from kdcore.data.bundles import load_dataset
from kdcore.data.dataset import Dataset

__all__ = ["Dataset", "load_dataset"]
