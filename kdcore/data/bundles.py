"""Dataset bundles: a folder with a JSON manifest, the arrays, and the teacher's weights.

Layout (see sample_data/digits_vendor/):

    manifest.json   name, class_names, input_shape, splits, teacher {architecture, weights},
                    student {architecture}, training_defaults
    data.npz        x_<split>, y_<split> (not for `unlabelled`), teacher_logits_<split>
    teacher.pt      a state dict, loaded with weights_only=True

:func:`load_bundle` checks the manifest (fields, and files inside the folder); the arrays are
checked when first read (:meth:`Bundle._check`), and what needs torch (architectures, weights)
by ``kdcore.learning.train.check_data``: all before a run is stored.

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
        """Every array of the data file, validated (see :meth:`_check`)."""
        file = self.member(self.manifest["data"])
        arrays = _read_npz(file)
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
        return _read_npz(self.member(name))

    def member(self, name: object) -> Path:
        """A file the manifest names, which must lie inside the bundle folder."""
        return _member(self.path, name)

    def _check(self, arrays: dict[str, np.ndarray], file: Path) -> None:
        """Refuse, with one line, arrays that training, the analysis or the ROI could not use:
        a required array missing, rows that disagree, an empty train or test split, inputs of
        different shapes or with NaN, logits not (n, K) or not finite, labels that are not
        integer class indices."""
        for split in ("train", "test"):
            for key in (f"x_{split}", f"y_{split}", f"teacher_logits_{split}"):
                if key not in arrays:
                    raise DataError(f"{file}: array {key!r} is missing; every bundle needs it")
        rows = None
        for split in SPLITS:
            if f"x_{split}" not in arrays:
                continue
            x = arrays[f"x_{split}"]
            if x.ndim < 2 or x.dtype.kind not in "biuf":
                raise DataError(f"{file}: x_{split} is {x.dtype} of shape {x.shape}; give it "
                                "numbers, one row per sample")
            rows = x.shape[1:] if rows is None else rows
            if x.shape[1:] != rows:
                raise DataError(f"{file}: x_{split} rows have shape {x.shape[1:]}, x_train's "
                                f"{rows}; give every split the same inputs")
            n = len(x)
            others = {k: arrays[k] for k in (f"y_{split}", f"teacher_logits_{split}")
                      if k in arrays}
            counts = {k: len(a) if a.ndim else 0 for k, a in others.items()}
            if any(count != n for count in counts.values()):
                raise DataError(f"{file}: x_{split} has {n} rows, but " + ", ".join(
                    f"{k} {count}" for k, count in counts.items()) + "; give them one row "
                    "per sample each")
            if n == 0 and split != "unlabelled":
                raise DataError(f"{file}: x_{split} has no rows; a bundle needs {split} samples")
            _check_finite(x, f"{file}: x_{split}")
            logits = arrays.get(f"teacher_logits_{split}")
            if (logits is None or logits.shape != (n, self.n_classes)
                    or logits.dtype.kind not in "iuf"):
                raise DataError(
                    f"{file}: teacher_logits_{split} must be numbers of shape "
                    f"({n}, {self.n_classes}); one row per sample, one column per class"
                )
            _check_finite(logits, f"{file}: teacher_logits_{split}", fix="fix the teacher outputs")
            labels = arrays.get(f"y_{split}")
            if labels is None:
                continue
            if labels.ndim != 1 or labels.dtype.kind not in "iu":
                raise DataError(f"{file}: y_{split} holds {labels.dtype} values of shape "
                                f"{labels.shape}; labels are class indices: store them as "
                                f"integers in [0, {self.n_classes})")
            bad = np.flatnonzero((labels < 0) | (labels >= self.n_classes))
            if len(bad):
                raise DataError(
                    f"{file}: y_{split} row {int(bad[0])} is not a class index in "
                    f"[0, {self.n_classes}); fix the labels"
                )


def _member(folder: Path, name: object) -> Path:
    """``name`` resolved in ``folder`` (symbolic links followed); a DataError unless it is a
    non-empty name that stays inside the folder."""
    if not isinstance(name, str) or not name:
        raise DataError(f"{folder / 'manifest.json'}: a file reference is {name!r}; "
                        "name a file inside the bundle folder")
    file = (folder / name).resolve()
    if not file.is_relative_to(folder.resolve()):
        raise DataError(f"{folder / 'manifest.json'}: {name!r} points outside the bundle "
                        "folder; keep the bundle's files inside it")
    return file


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, read without unpickling (object arrays are refused)."""
    try:  # opened here, so that a corrupt file is closed too (np.load leaks it)
        with file.open("rb") as handle:
            data = np.load(handle, allow_pickle=False)
            if isinstance(data, np.lib.npyio.NpzFile):
                with data:
                    return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{file}: cannot read its arrays ({exc}); rebuild it") from None
    raise DataError(f"{file}: one array, not an .npz archive of named arrays; save it with "
                    "numpy.savez")


def _check_finite(array: np.ndarray, what: str, fix: str = "fix or drop that row") -> None:
    """A DataError naming the first row that holds NaN or inf."""
    if array.dtype.kind != "f":
        return
    finite = np.isfinite(array.reshape(len(array), -1)).all(1)
    if not finite.all():
        raise DataError(f"{what} row {int(np.flatnonzero(~finite)[0])} is NaN or inf; {fix}")


def _check_manifest(manifest: dict, file: Path, folder: Path) -> None:
    """Refuse, with one line, a manifest whose fields have the wrong type, or that names a file
    outside the bundle folder (symbolic links included). The architectures' options and the
    training defaults' values are checked where they are used (``TrainConfig.for_bundle``)."""
    see = f"see sample_data/{SAMPLE_NAME}/manifest.json"
    names = manifest["class_names"]
    if (not isinstance(names, list) or len(names) < 2
            or not all(isinstance(c, str | int) and not isinstance(c, bool) for c in names)):
        raise DataError(f"{file}: class_names is {names!r}; give a list of at least two class "
                        "names")
    if len({str(c) for c in names}) < len(names):
        raise DataError(f"{file}: class_names has duplicates; give each class its own name")
    if not isinstance(manifest["name"], str) or not manifest["name"]:
        raise DataError(f"{file}: name is {manifest['name']!r}; give the bundle a name")
    for key in ("input_shape", "image_shape"):
        shape = manifest.get(key)
        if (shape is not None or key == "input_shape") and not (isinstance(shape, list) and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)):
            raise DataError(f"{file}: {key} is {shape!r}; give a list of positive whole numbers")
    for model in ("teacher", "student"):
        part = manifest[model]
        if not isinstance(part, dict) or not isinstance(part.get("architecture"), dict):
            raise DataError(f"{file}: {model} is {part!r}; give an object with an "
                            f"architecture object; {see}")
    if not isinstance(manifest.get("training_defaults", {}), dict):
        raise DataError(f"{file}: training_defaults is {manifest['training_defaults']!r}; give "
                        f"an object of training options, or leave it out; {see}")
    files = [manifest["data"], manifest["teacher"].get("weights")]
    if manifest.get("analysis_only_labels"):
        files.append(manifest["analysis_only_labels"])
    for name in files:
        _member(folder, name)  # each is read when used (the teacher's weights by train and roi)


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
    except UnicodeDecodeError as exc:
        raise DataError(f"{manifest_file}: not UTF-8 text (byte {exc.object[exc.start]:#x} at "
                        f"position {exc.start}); save the manifest as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{manifest_file}: not valid JSON ({exc}); fix or rebuild the manifest") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{manifest_file}: must be a JSON object; see sample_data/{SAMPLE_NAME}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise DataError(f"{manifest_file}: missing key {missing[0]!r}; "
                        f"see sample_data/{SAMPLE_NAME}/manifest.json")
    _check_manifest(manifest, manifest_file, path.resolve())
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
