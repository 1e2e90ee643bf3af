"""Tabular datasets for training: numeric features, a label, and the teacher's logits per row.

A CSV or Parquet file with

* numeric feature columns (every column that has no other role);
* a label column (``label_column``, e.g. ``y``): a class index 0..K-1 or a class name; empty
  only on rows whose split is ``unlabelled``;
* optionally a split column (``split_column``, default ``split``) with ``train``,
  ``unlabelled`` or ``test`` on every row; without one, the labelled rows are split 70/30
  (``test_size``) into train and test, stratified by class, with ``seed``;
* the teacher's outputs on the same rows: ``logit_<class>`` (or ``prob_<class>``) columns in the
  same file, or a second file (``teacher_logits``) of ``sample_id`` plus those columns, joined
  on ``sample_id`` (then the data file needs a ``sample_id`` column too);
* optionally ``sample_id`` (unique).

:func:`load_tabular` returns a :class:`TabularDataset`, a :class:`kdcore.data.dataset.Dataset`
like a bundle, so training, ``compare`` and the analysis use it unchanged. The student is an MLP
from the model zoo; there is no teacher model, only its outputs (``teacher_spec`` and
``teacher_weights`` are None).

Files are read by :func:`kdcore.data.tables.read_frame`, the reader of prediction tables, and
the label, split, sample_id and teacher-output columns are validated by
:func:`kdcore.data.tables.validate_frame` (the prediction-table contract, with messages naming
this file's columns); features and the join are checked here. Every problem raises
:class:`~kdcore.errors.DataError` with one line naming the file, the column, the first bad data
row (counted from 1, header not counted) and the fix. The format is detected from the content
(Parquet magic bytes), never from the file name, and nothing is unpickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from kdcore.data.tables import (
    LOGIT_PREFIX,
    PROB_PREFIX,
    SPLITS,
    PredictionTable,
    check_unique_columns,
    data_error,
    display_name,
    is_index_column,
    numeric_or_fail,
    read_frame,
    show_value,
    validate_frame,
)
from kdcore.errors import DataError

__all__ = ["DEFAULT_HIDDEN", "TabularDataset", "load_tabular"]

DEFAULT_HIDDEN: tuple[int, ...] = (64,)
# log(p) stands in for the logits of a teacher given as probabilities; p = 0 is clipped here.
_MIN_PROBABILITY = 1e-12
_ROLE = {"train": "learns from", "test": "is tested on"}
_FEATURE_FIX = ("feature columns must be numeric: encode categories as numbers (e.g. one-hot "
                "columns) or drop the column.")


@dataclass(eq=False)
class TabularDataset:
    """A loaded tabular dataset (a :class:`~kdcore.data.dataset.Dataset`).

    Features are standardised with the mean and standard deviation of the training rows
    (``train`` and ``unlabelled``; never ``test``); ``x(split)`` returns them as float32.
    """

    path: Path
    class_names: list[str]
    feature_names: list[str]
    hidden: tuple[int, ...]
    data_options: dict
    teacher_kind: str
    feature_mean: np.ndarray = field(repr=False)
    feature_std: np.ndarray = field(repr=False)
    _x: dict[str, np.ndarray] = field(repr=False)
    _y: dict[str, np.ndarray | None] = field(repr=False)
    _logits: dict[str, np.ndarray] = field(repr=False)
    _ids: dict[str, np.ndarray | None] = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def image_shape(self) -> list[int] | None:
        return None

    @property
    def training_defaults(self) -> dict:
        return {}

    @property
    def teacher_spec(self) -> dict | None:
        """None: only the teacher's outputs are known, not its architecture."""
        return None

    @property
    def teacher_weights(self) -> None:
        return None

    @property
    def student_spec(self) -> dict:
        return {"type": "mlp", "input_dim": self.n_features, "hidden": list(self.hidden),
                "n_classes": self.n_classes}

    @property
    def manifest(self) -> dict:
        """A bundle-like description (no arrays), for code that reads a bundle's manifest."""
        return {
            "format": "kdcore-tabular/1",
            "name": self.name,
            "class_names": list(self.class_names),
            "input_shape": [self.n_features],
            "feature_names": list(self.feature_names),
            "splits": {s: int(len(self._x[s])) for s in self.splits},
            "teacher": None,
            "student": {"architecture": self.student_spec},
            "data_options": dict(self.data_options),
        }

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self._x]

    def x(self, split: str) -> np.ndarray:
        return self._x[split]

    def y(self, split: str) -> np.ndarray | None:
        """Labels of a split; None for unlabelled transfer data."""
        return self._y[split]

    def teacher_logits(self, split: str) -> np.ndarray:
        return self._logits[split]

    def sample_ids(self, split: str) -> np.ndarray | None:
        """The split's sample_id values in row order, or None without a sample_id column."""
        return self._ids[split]

    def analysis_labels(self) -> dict[str, np.ndarray]:
        return {}


# --------------------------------------------------------------------------------------------
# Loading


def load_tabular(
    path: str | Path,
    *,
    label_column: str,
    teacher_logits: str | Path | None = None,
    split_column: str | None = "split",
    test_size: float = 0.3,
    seed: int = 0,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
) -> TabularDataset:
    """Load and validate a tabular dataset (CSV or Parquet) for training.

    Parameters
    ----------
    path : the data file: features, the label column, optional split and sample_id columns,
        and the teacher's ``logit_<class>`` columns unless ``teacher_logits`` is given.
    label_column : the column holding each row's class (index 0..K-1 or class name).
    teacher_logits : a second CSV/Parquet file with ``sample_id`` and ``logit_<class>`` (or
        ``prob_<class>``) columns, joined on ``sample_id``; every data row needs exactly one
        logits row and vice versa.
    split_column : the column with train/unlabelled/test. When it is ``"split"`` (the default)
        and absent, or None, the rows are split at random, stratified by class: ``test_size``
        of each class to test, the rest to train.
    seed : the seed of that random split (independent of the training seed, so every run of a
        comparison sees the same split).
    hidden : the student MLP's hidden layer sizes.

    Probabilities (``prob_`` columns) are turned into logits as ``log(p)``.
    """
    display = display_name(path, None)
    hidden = _check_hidden(hidden)
    if not isinstance(label_column, str) or not label_column:
        raise DataError("label_column must name a column (--label-column NAME)")
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)) or not (
            0 < float(test_size) < 1):
        raise DataError(f"test_size is {test_size!r}; give a share between 0 and 1, e.g. 0.3 "
                        "(--test-size)")
    df = _read_frame(Path(path), display)
    columns = list(df.columns)

    if label_column not in columns:
        near = [c for c in columns if isinstance(c, str)
                and c.strip().lower() == label_column.strip().lower()]
        fix = (f"pass --label-column {near[0]!r}." if near else
               "pass --label-column with the name of the column that holds each row's class "
               f"(columns: {_names(columns)}).")
        raise data_error(display, f"there is no label column {label_column!r}", fix)
    if split_column is not None and split_column not in columns:
        if split_column != "split":
            raise data_error(display, f"there is no split column {split_column!r}",
                             "pass --split-column with the column holding train/unlabelled/"
                             f"test, or leave it out for an automatic {1 - test_size:.0%}/"
                             f"{test_size:.0%} train/test split.")
        split_column = None
    for reserved, role, flag in (("label", label_column, "--label-column"),
                                 ("split", split_column, "--split-column")):
        if reserved in columns and reserved != role:
            raise data_error(display, f"a column is named {reserved!r} but the {reserved} column "
                             f"is {role!r}, so it would be used as a feature",
                             f"rename or drop it, or pass {flag} {reserved}.", column=reserved)

    outputs = [c for c in columns if isinstance(c, str)
               and (c.startswith(LOGIT_PREFIX) or c.startswith(PROB_PREFIX))]
    roles = {label_column, "sample_id", *outputs}
    if split_column is not None:
        roles.add(split_column)
    features = [c for c in columns if c not in roles]
    if not features:
        raise data_error(display, "there are no feature columns",
                         f"add numeric feature columns; every column other than {label_column!r}, "
                         "split, sample_id and the logit_ columns is a feature.")

    if teacher_logits is not None:
        logits_path = Path(teacher_logits)
        if outputs:
            raise data_error(display, f"it has teacher-output columns ({outputs[0]}, ...) and a "
                             f"separate teacher-logits file was given too",
                             "use one: drop the logit_ columns, or leave out --teacher-logits.")
        teacher_frame = _joined_outputs(df, display, logits_path)
    elif not outputs:
        raise data_error(display, "there are no teacher-output columns",
                         "add the teacher's logit_<class> columns (one per class, in class "
                         "order), or pass --teacher-logits FILE with sample_id and logit_<class> "
                         "columns.")
    else:
        teacher_frame = df[outputs]

    table = _validate_contract(df, teacher_frame, display, label_column, split_column)
    x = _features(df, features, display)
    del df, teacher_frame

    if table.split is not None:
        split = np.asarray(table.split, dtype=object)
        for needed in ("train", "test"):
            if not (split == needed).any():
                raise data_error(display, f"no row has split {needed!r}",
                                 f"mark the rows the student {_ROLE[needed]} as {needed!r}, or "
                                 "drop the split column for an automatic "
                                 f"{1 - test_size:.0%}/{test_size:.0%} split.",
                                 column=split_column)
    else:
        split = _stratified_split(table.labels, test_size, seed, display)

    fit_rows = split != "test"
    mean = x[fit_rows].mean(axis=0)
    std = x[fit_rows].std(axis=0)
    std[~(std > 0)] = 1.0
    x = ((x - mean) / std).astype(np.float32)

    logits = table.outputs
    if table.probabilities:
        logits = np.log(np.maximum(logits, _MIN_PROBABILITY)).astype(np.float32)

    xs, ys, ts, ids = {}, {}, {}, {}
    for name in SPLITS:
        rows = np.flatnonzero(split == name)
        if len(rows) == 0:
            continue
        xs[name] = x[rows]
        ts[name] = np.ascontiguousarray(logits[rows])
        ids[name] = None if table.sample_id is None else table.sample_id[rows]
        labels = table.labels[rows]
        if name == "unlabelled":
            ys[name] = None  # transfer data: a label given here is not used to train
        else:
            ys[name] = labels.astype(np.int64)

    options = {
        "label_column": label_column,
        "teacher_logits": None if teacher_logits is None else str(Path(teacher_logits).resolve()),
        "split_column": split_column,
        "test_size": float(test_size),
        "split_seed": int(seed),
        "hidden": list(hidden),
    }
    return TabularDataset(
        path=Path(path).resolve(), class_names=list(table.class_names),
        feature_names=[str(c) for c in features], hidden=hidden, data_options=options,
        teacher_kind=table.kind, feature_mean=mean, feature_std=std,
        _x=xs, _y=ys, _logits=ts, _ids=ids,
    )


def _check_hidden(hidden: Sequence[int]) -> tuple[int, ...]:
    try:
        sizes = tuple(hidden)
    except TypeError:
        sizes = None
    if sizes is None or not all(isinstance(h, (int, np.integer)) and not isinstance(h, bool)
                                and h > 0 for h in sizes):
        raise DataError(f"hidden layer sizes {hidden!r}: give positive whole numbers, "
                        "e.g. --hidden 64,32")
    return tuple(int(h) for h in sizes)


def _names(columns: Sequence[object], limit: int = 8) -> str:
    shown = ", ".join(str(c) for c in columns[:limit])
    return shown + (", …" if len(columns) > limit else "")


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class _Columns:
    """Every column of a tabular file (features have no fixed names), for read_frame."""

    names: tuple[object, ...]

    def to_read(self) -> None:
        return None

    def csv_types(self, *, as_text: bool) -> dict[str, pa.DataType]:
        # sample_id is text (ids are matched across files as written); the rest is inferred.
        types = {c: pa.string() for c in self.names} if as_text else {}
        if "sample_id" in self.names:
            types["sample_id"] = pa.string()
        return types


def _read_frame(path: Path, display: str) -> pd.DataFrame:
    """The file as a DataFrame, its column names checked (see kdcore.data.tables.read_frame)."""
    return read_frame(path, display, lambda names: _checked_columns(names, display))[0]


def _checked_columns(names: Sequence[object], display: str) -> _Columns:
    check_unique_columns(names, display)
    for col in names:
        if is_index_column(col):
            raise data_error(display, "it looks like a saved row index (it would be used as a "
                             "feature)", "delete the column, or write the file with index=False.",
                             column=col)
    return _Columns(tuple(names))


# --------------------------------------------------------------------------------------------
# The prediction-table part: label, split, sample_id and teacher outputs


def _validate_contract(df: pd.DataFrame, teacher: pd.DataFrame, display: str, label_column: str,
                       split_column: str | None) -> PredictionTable:
    """Check label/split/sample_id/outputs with kdcore.data.tables, naming this file's columns."""
    frame = pd.DataFrame({"label": _label_text(df[label_column])})
    for col in teacher.columns:
        frame[col] = teacher[col].to_numpy()
    if split_column is not None:
        frame["split"] = df[split_column].to_numpy()
    if "sample_id" in df.columns:
        frame["sample_id"] = df["sample_id"].to_numpy()
    return validate_frame(frame, source=display,
                          column_names={"label": label_column, "split": split_column or "split"})


def _label_text(ser: pd.Series) -> pd.Series:
    """Labels as text ("3", "cat"), so 3, 3.0 and "3" all name class 3; missing stays missing."""
    ser = ser.reset_index(drop=True)
    if pd.api.types.is_float_dtype(ser.dtype):
        values = ser.to_numpy(dtype=np.float64, na_value=np.nan)
        whole = np.isfinite(values) & (values == np.round(values))
        out = ser.astype(object)
        out[whole] = values[whole].astype(np.int64).astype(str)
        return out
    return ser


def _joined_outputs(df: pd.DataFrame, display: str, logits_path: Path) -> pd.DataFrame:
    """The teacher's outputs from a second file, in the data file's row order."""
    other = display_name(logits_path, None)
    if other == display:
        other = f"{other} (teacher logits)"
    logits_df = _read_frame(logits_path, other)
    columns = list(logits_df.columns)
    if "sample_id" not in columns:
        raise data_error(other, "there is no 'sample_id' column",
                         f"add a sample_id column with the ids of the rows of {display}, so each "
                         "row of logits can be matched with its sample.")
    outputs = [c for c in columns if isinstance(c, str)
               and (c.startswith(LOGIT_PREFIX) or c.startswith(PROB_PREFIX))]
    for col in columns:
        if col != "sample_id" and col not in outputs:
            raise data_error(other, "unknown column in a teacher-logits file",
                             "a teacher-logits file holds sample_id and the logit_<class> (or "
                             "prob_<class>) columns only; remove it.", column=col)
    if not outputs:
        raise data_error(other, "there are no teacher-output columns",
                         "name the teacher's outputs logit_<class>, one column per class.")
    # The outputs and the ids, checked by the prediction-table rules (row numbers of this file).
    check = pd.DataFrame({"label": pd.Series([None] * len(logits_df), dtype=object),
                          "split": "unlabelled"})
    for col in outputs:
        check[col] = logits_df[col].to_numpy()
    check["sample_id"] = logits_df["sample_id"].to_numpy()
    checked = validate_frame(check, source=other)
    del check

    if "sample_id" not in df.columns:
        raise data_error(display, "there is no 'sample_id' column",
                         f"add a sample_id column (the ids used in {other}) so the teacher's "
                         "logits can be matched with the rows.")
    keys = _keys(df["sample_id"])
    empty = keys == ""
    if empty.any():
        i = int(np.argmax(empty))
        raise data_error(display, "the sample_id is empty",
                         f"give every row the sample_id of its logits row in {other}.",
                         column="sample_id", row=i + 1)
    their = _keys(pd.Series(checked.sample_id))
    position = pd.Index(their).get_indexer(keys)
    missing = position < 0
    if missing.any():
        i = int(np.argmax(missing))
        raise data_error(display, f"sample_id {show_value(keys[i])} is not in {other}",
                         f"give {other} one row of teacher logits for every sample_id of "
                         f"{display}.",
                         column="sample_id", row=i + 1)
    used = np.zeros(len(their), dtype=bool)
    used[position] = True
    if not used.all() and len(np.unique(position)) == len(position):
        j = int(np.argmax(~used))
        raise data_error(other, f"sample_id {show_value(their[j])} is not in {display}",
                         f"drop that row from {other}, or add the sample to {display}.",
                         column="sample_id", row=j + 1)
    return pd.DataFrame(checked.outputs[position], columns=outputs)


def _keys(ser: pd.Series) -> np.ndarray:
    """sample_id values as stripped text, for matching ids across two files."""
    values = ser.reset_index(drop=True)
    if pd.api.types.is_float_dtype(values.dtype):
        values = pd.Series(_label_text(values), dtype=object)
    text = values.astype("string").str.strip().fillna("")
    return text.to_numpy(dtype=object)


# --------------------------------------------------------------------------------------------
# Features and the split


def _features(df: pd.DataFrame, features: list[object], display: str) -> np.ndarray:
    """The feature columns as one float64 (n, F) array; names the first bad cell."""
    x = np.empty((len(df), len(features)), dtype=np.float64)
    for j, col in enumerate(features):
        ser = df[col].reset_index(drop=True)
        dtype = ser.dtype
        if pd.api.types.is_bool_dtype(dtype):
            values = ser.to_numpy(dtype=np.float64, na_value=np.nan)
        elif (pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype)
              and not isinstance(dtype, pd.CategoricalDtype)):
            values = ser.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            values = numeric_or_fail(ser, col, display, _FEATURE_FIX)
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            problem = ("the feature value is empty or NaN" if np.isnan(values[i])
                       else "the feature value is infinite")
            raise data_error(display, problem, "every feature cell needs a finite number: fill in "
                             "(impute) the missing values or drop the row.", column=col, row=i + 1)
        x[:, j] = values
    return x


def _stratified_split(labels: np.ndarray, test_size: float, seed: int, display: str) -> np.ndarray:
    """train/test per row: ``test_size`` of each class to test (at random), the rest to train."""
    n = len(labels)
    if n < 2:
        raise data_error(display, f"there is {n} labelled row, too few to split into train and "
                         "test", "add rows, or a split column with train and test rows.")
    rng = np.random.default_rng(seed)
    split = np.full(n, "train", dtype=object)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = int(round(len(rows) * test_size))
        k = min(k, len(rows) - 1) if len(rows) > 1 else 0
        if k:
            split[rng.permutation(rows)[:k]] = "test"
    if not (split == "test").any():  # tiny data: at least one test row
        split[rng.permutation(n)[0]] = "test"
    return split
