"""The one interface of training data: what a bundle and a tabular file both provide.

Training, ``compare``, the ROI and the report read a dataset only through :class:`Dataset`, so
a bundle folder (:class:`kdcore.data.bundles.Bundle`) and a CSV/Parquet file
(:class:`kdcore.data.tabular.TabularDataset`) are used alike; :func:`kdcore.data.load_dataset`
returns one or the other for a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class Dataset(Protocol):
    """Labelled data with the teacher's outputs on every row, split into train, optional
    unlabelled (transfer data) and test."""

    @property
    def path(self) -> Path:
        """Where the data lives (a bundle folder or the data file), resolved."""

    @property
    def name(self) -> str: ...

    @property
    def class_names(self) -> list[str]: ...

    @property
    def n_classes(self) -> int: ...

    @property
    def splits(self) -> list[str]:
        """The splits present, in the order train, unlabelled, test."""

    def x(self, split: str) -> np.ndarray:
        """The inputs of a split, one row per sample."""

    def y(self, split: str) -> np.ndarray | None:
        """Labels of a split; None for unlabelled transfer data."""

    def teacher_logits(self, split: str) -> np.ndarray:
        """The teacher's logits, (n, K) float32, in the row order of ``x(split)``."""

    def sample_ids(self, split: str) -> np.ndarray | None:
        """The split's sample ids in row order, or None when the data has none."""

    def analysis_labels(self) -> dict[str, np.ndarray]:
        """True labels kept for analysis only (never used to train), if the data has them."""

    @property
    def teacher_spec(self) -> dict | None:
        """The teacher's architecture (a model-zoo spec), or None when only its outputs are
        known."""

    @property
    def teacher_weights(self) -> Path | None:
        """The teacher's state dict (a file), or None when only its outputs are known."""

    @property
    def student_spec(self) -> dict: ...

    @property
    def training_defaults(self) -> dict:
        """Recommended TrainConfig values for this data ({} for none)."""

    @property
    def data_options(self) -> dict:
        """The options that load this data again with ``load_dataset`` ({} for a bundle)."""

    @property
    def image_shape(self) -> list[int] | None:
        """The shape of one input as an image, or None when the inputs are not images."""

    @property
    def manifest(self) -> dict:
        """A bundle manifest (for tabular data: a bundle-like description, no arrays)."""
