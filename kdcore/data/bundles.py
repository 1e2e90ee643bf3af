"""Dataset bundles: a folder with a JSON manifest, the arrays, and the teacher's weights.

Layout (see sample_data/digits_vendor/):

    manifest.json   name, class_names, input_shape, splits, teacher {architecture, weights},
                    student {architecture}, training_defaults
    data.npz        x_<split>, y_<split> (not for `unlabelled`), teacher_logits_<split>
    teacher.pt      a state dict, loaded with weights_only=True

Splits: ``train`` (labelled, the distillation data), optional ``unlabelled`` (transfer data:
inputs and teacher outputs only) and ``test`` (held out).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

from kdcore.data.dataset import Dataset
from kdcore.errors import DataError

SAMPLE_NAME = "digits_vendor"
SPLITS = ("train", "unlabelled", "test")
REQUIRED_KEYS = ("name", "class_names", "input_shape", "data", "teacher", "student")


def sample_bundle_path() -> Path:
    """The bundled sample: package data of kdcore.sample_data (the repository's sample_data/),
    so a wheel and an editable install find it alike."""
    return Path(str(resources.files("kdcore.sample_data") / SAMPLE_NAME))


@dataclass
class Bundle:
    """A loaded dataset bundle (a :class:`~kdcore.data.dataset.Dataset`). Arrays are read once,
    on first use."""

    path: Path
    manifest: dict = field(repr=False)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.manifest["class_names"]]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> list[int] | None:
        return self.manifest.get("image_shape")

    @property
    def training_defaults(self) -> dict:
        return dict(self.manifest.get("training_defaults", {}))

    @property
    def teacher_spec(self) -> dict:
        return dict(self.manifest["teacher"]["architecture"])

    @property
    def teacher_weights(self) -> Path:
        return self.member(self.manifest["teacher"]["weights"])

    @property
    def student_spec(self) -> dict:
        return dict(self.manifest["student"]["architecture"])

    @property
    def data_options(self) -> dict:
        """Empty: a bundle folder loads without options."""
        return {}

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        file = self.member(self.manifest["data"])
        try:
            with np.load(file, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(
                f"{file}: cannot read the bundle's arrays ({exc}); rebuild it") from None
        self._check(arrays, file)
        return arrays

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if f"x_{s}" in self.arrays]

    def x(self, split: str) -> np.ndarray:
        return self.arrays[f"x_{split}"]

    def y(self, split: str) -> np.ndarray | None:
        """Labels of a split; None for unlabelled transfer data."""
        return self.arrays.get(f"y_{split}")

    def teacher_logits(self, split: str) -> np.ndarray:
        return self.arrays[f"teacher_logits_{split}"]

    def sample_ids(self, split: str) -> None:
        """None: a bundle's rows are named by split and position (see analysis.label_quality's
        sample_keys)."""
        return None

    def analysis_labels(self) -> dict[str, np.ndarray]:
        """True labels kept for analysis only (never used to train), if the bundle has them."""
        name = self.manifest.get("analysis_only_labels")
        if not name:
            return {}
        with np.load(self.member(name), allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def member(self, name: object) -> Path:
        """A file the manifest names, which must lie inside the bundle folder."""
        if not isinstance(name, str) or not name:
            raise DataError(f"{self.path / 'manifest.json'}: a file reference is {name!r}; "
                            "name a file inside the bundle folder")
        file = (self.path / name).resolve()
        if not file.is_relative_to(self.path.resolve()):
            raise DataError(f"{self.path / 'manifest.json'}: {name!r} points outside the bundle "
                            "folder; keep the bundle's files inside it")
        return file

    def _check(self, arrays: dict[str, np.ndarray], file: Path) -> None:
        for split in ("train", "test"):
            for key in (f"x_{split}", f"y_{split}", f"teacher_logits_{split}"):
                if key not in arrays:
                    raise DataError(f"{file}: array {key!r} is missing; every bundle needs it")
        for split in SPLITS:
            if f"x_{split}" not in arrays:
                continue
            n = len(arrays[f"x_{split}"])
            logits = arrays.get(f"teacher_logits_{split}")
            if logits is None or logits.shape != (n, self.n_classes):
                raise DataError(
                    f"{file}: teacher_logits_{split} must have shape ({n}, {self.n_classes}); "
                    "one row per sample, one column per class"
                )
            if not np.isfinite(logits).all():
                row = int(np.flatnonzero(~np.isfinite(logits).all(1))[0])
                raise DataError(f"{file}: teacher_logits_{split} row {row} is NaN or inf; "
                                "fix the teacher outputs")
            labels = arrays.get(f"y_{split}")
            if labels is not None:
                bad = np.flatnonzero((labels < 0) | (labels >= self.n_classes))
                if len(labels) != n or len(bad):
                    where = (f"row {int(bad[0])}" if len(bad)
                             else f"{len(labels)} labels for {n} rows")
                    raise DataError(
                        f"{file}: y_{split} {where} is not a class index in "
                        f"[0, {self.n_classes}); fix the labels"
                    )


def load_bundle(path: str | Path | None = None) -> Bundle:
    """Load a bundle folder (or its manifest.json); None loads the bundled sample."""
    path = Path(path) if path is not None else sample_bundle_path()
    if path.name == "manifest.json":
        path = path.parent
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise DataError(f"{path}: no manifest.json; a bundle is a folder with manifest.json "
                        "and its arrays")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{manifest_file}: not valid JSON ({exc}); fix or rebuild the manifest") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{manifest_file}: must be a JSON object; see sample_data/{SAMPLE_NAME}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise DataError(f"{manifest_file}: missing key {missing[0]!r}; "
                        f"see sample_data/{SAMPLE_NAME}/manifest.json")
    if len(manifest["class_names"]) < 2:
        raise DataError(f"{manifest_file}: class_names needs at least two classes")
    return Bundle(path=path.resolve(), manifest=manifest)


def is_bundle(path: str | Path) -> bool:
    path = Path(path)
    return (path / "manifest.json").is_file() or path.name == "manifest.json"


_TABULAR_OPTIONS = ("label_column", "teacher_logits", "split_column", "test_size", "split_seed",
                    "hidden")


def load_dataset(path: str | Path | None = None, **data_options) -> Dataset:
    """The training data behind a path: a bundle folder, or a CSV/Parquet tabular file.

    ``data_options`` are the tabular options (``label_column`` (default ``label``),
    ``teacher_logits``, ``split_column``, ``test_size``, ``split_seed``, ``hidden``), as stored
    in a run's ``TrainConfig.data_options``; a bundle takes none. None loads the bundled sample.
    """
    given = {k: v for k, v in data_options.items() if v is not None}
    unknown = sorted(set(given) - set(_TABULAR_OPTIONS))
    if unknown:
        raise DataError(f"unknown data option {unknown[0]!r}; use {', '.join(_TABULAR_OPTIONS)}")
    if path is None or is_bundle(path) or Path(path).is_dir():
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise DataError(f"{Path(path).name if path else SAMPLE_NAME}: {flag} applies to CSV "
                            "or Parquet files, not to a bundle folder; leave it out")
        return load_bundle(path)
    from kdcore.data.tabular import load_tabular

    given.setdefault("label_column", "label")
    if "split_seed" in given:
        given["seed"] = given.pop("split_seed")
    return load_tabular(path, **given)
