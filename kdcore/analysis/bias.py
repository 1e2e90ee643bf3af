"""Teacher-bias decomposition: where a teacher is wrong, and how sure it was (docs/method.md).

A sample is *right* when the teacher's argmax equals its label and *wrong* otherwise; the wrong
samples are the teacher's bias. From ``(labels, teacher_outputs)`` this module computes, with
numpy only (and scipy.sparse for the confusion of more than ``SPARSE_CONFUSION_CLASSES``
classes):

* :func:`decompose` -- a :class:`BiasReport`: per-sample right/wrong and confidence, the
  confusion of the teacher's errors (true x predicted, off-diagonal), a per-class table with each
  class's bias rate, and the most frequent confusions.
* :func:`count_confusion`, :func:`confusion_cells`, :func:`confusion_json` -- a confusion of
  pairs, dense up to ``SPARSE_CONFUSION_CLASSES`` classes and sparse above, and its cells.
* :class:`BiasAccumulator` -- the same aggregate numbers for data that arrives in chunks.
* :func:`reliability` -- a reliability-diagram table (confidence against accuracy, by bin).
* :func:`predicted_distribution` -- what the teacher predicts on an unlabelled split.
* :func:`softened` and :func:`rectified` -- the teacher's distribution at a temperature, and
  the one a bias-aware student is taught instead (swap rectification).

``teacher_outputs`` is an ``(N, K)`` array of logits (default) or of probabilities
(``probabilities=True``). It is read in place, in chunks of rows: no full-size copy is made.
Temperature plays no part in the decomposition.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from kdcore.errors import DataError

__all__ = [
    "SPARSE_CONFUSION_CLASSES",
    "BiasAccumulator",
    "BiasReport",
    "confusion_cells",
    "confusion_json",
    "count_confusion",
    "decompose",
    "predicted_distribution",
    "rectified",
    "reliability",
    "softened",
    "softmax",
]

# Rows are processed in blocks of about this many values (2 MiB of float32): large enough
# that the per-block Python calls (which hold the GIL) stay rare, small enough to stay in
# cache while the softmax denominator is computed. 1 << 17 was 30% slower on 2 cores.
_CHUNK_VALUES = 1 << 19
_THREADS = max(1, min(os.cpu_count() or 1, 4))
_PARALLEL_VALUES = 1 << 22  # below ~4M values one thread is as fast
# |max logit| up to which a row's unshifted powers 2^(z log2 e) and their sum stay finite and
# normal in float32 (e^60 ~ 1e26: even 10^11 classes sum below float32's 3e38).
_SAFE_EXP = 60.0
_LOG2_E = math.log2(math.e)
# Probabilities from a float32 softmax can exceed 1 by rounding.
_PROBABILITY_SLACK = 1e-4
# log(p) stands in for the logits of probabilities; p = 0 is clipped here.
_MIN_PROBABILITY = 1e-12
# Above this many classes a confusion (true x predicted counts) is kept and reported sparse, as
# its nonzero cells: a dense one of 10,000 classes is 800 MB of int64.
SPARSE_CONFUSION_CLASSES = 1_000
# Sparse cells gathered from blocks and chunks are merged once more than this many (and more
# than are merged already) are waiting, so merging costs O(n log n) over a whole stream.
_COMPACT_CELLS = 1 << 20


@dataclass(frozen=True, eq=False)
class BiasReport:
    """The teacher's bias on one labelled data set.

    Attributes
    ----------
    class_names : list[str]
        One name per class, in column order of the teacher's outputs.
    labels, predicted : np.ndarray of int64, shape (N,) or None
        Ground-truth class index and the teacher's argmax, per sample.
    confidence : np.ndarray of float, shape (N,) or None
        The teacher's top probability per sample (softmax of logits, or the given probability).
    wrong : np.ndarray of bool, shape (N,) or None
        ``predicted != labels``.
    error_confusion : np.ndarray of int64, shape (K, K), or scipy.sparse.coo_array
        Count of wrong samples by true class (row) and teacher's prediction (column); the
        diagonal is zero. Above ``SPARSE_CONFUSION_CLASSES`` classes a sparse array of the
        nonzero cells (see :func:`confusion_cells`).
    per_class : pd.DataFrame
        One row per class with columns ``class``, ``support``, ``teacher_accuracy``,
        ``bias_rate`` (wrong / support; NaN for a class with no samples),
        ``most_confused_with`` (the class the teacher most often predicts instead, None if never
        wrong), ``mean_confidence_wrong`` (NaN if never wrong) and ``share_of_errors`` (this
        class's errors over all errors; NaN if the teacher is never wrong).
    top_confusions : pd.DataFrame
        Columns ``true``, ``predicted``, ``count``, ``share`` (of all errors), one row per
        nonzero off-diagonal cell, by count descending (ties by true then predicted index).
    accuracy : float
        Share of samples the teacher gets right.

    The per-sample fields are None in a report built by :class:`BiasAccumulator`, which keeps
    only the aggregates.
    """

    class_names: list[str]
    labels: np.ndarray | None
    predicted: np.ndarray | None
    confidence: np.ndarray | None
    wrong: np.ndarray | None
    error_confusion: Any
    per_class: pd.DataFrame
    top_confusions: pd.DataFrame
    accuracy: float

    @property
    def bias_rate(self) -> float:
        """Share of samples the teacher gets wrong (``1 - accuracy``)."""
        return 1.0 - self.accuracy

    @property
    def n_samples(self) -> int:
        """Number of labelled samples summarised."""
        return int(self.per_class["support"].sum())

    @property
    def n_classes(self) -> int:
        """Number of classes K."""
        return len(self.class_names)

    def to_dict(self, *, top: int = 10) -> dict[str, Any]:
        """Return the aggregate numbers as plain Python types, ready for ``json.dumps``.

        NaN becomes None. Keys: ``n_samples``, ``n_classes``, ``class_names``,
        ``teacher_accuracy``, ``bias_rate``, ``per_class`` (one object per class, keys as the
        ``per_class`` columns), ``error_confusion`` (:func:`confusion_json`: nested lists, or
        ``[true, predicted, count]`` cells above ``SPARSE_CONFUSION_CLASSES`` classes) and
        ``top_confusions`` (the first ``top`` rows of ``top_confusions``). Per-sample arrays are
        left out.
        """
        return {
            "n_samples": self.n_samples,
            "n_classes": self.n_classes,
            "class_names": list(self.class_names),
            "teacher_accuracy": _plain(self.accuracy),
            "bias_rate": _plain(self.bias_rate),
            "per_class": _records(self.per_class),
            "error_confusion": confusion_json(self.error_confusion),
            "top_confusions": _records(self.top_confusions.head(top)),
        }


class BiasAccumulator:
    """Build a :class:`BiasReport` from data that arrives in chunks.

    Keeps only the confusion counts (K x K, or its nonzero cells above
    ``SPARSE_CONFUSION_CLASSES`` classes) and K sums, so memory does not grow with the number of
    rows beyond the distinct (true, predicted) pairs seen. ``report()``
    gives the same aggregates as :func:`decompose` on all chunks at once (per-sample fields are
    None).

    Parameters
    ----------
    n_classes : int
        Number of classes K (columns of every chunk's ``teacher_outputs``).
    class_names : sequence of str, optional
        One name per class; defaults to ``"0"`` ... ``"K-1"``. Required for string labels.
    probabilities : bool, default False
        True when ``teacher_outputs`` holds probabilities rather than logits.
    """

    def __init__(
        self,
        n_classes: int,
        *,
        class_names: Sequence[str] | None = None,
        probabilities: bool = False,
    ) -> None:
        if n_classes < 2:
            raise DataError(f"n_classes is {n_classes}; a teacher needs at least 2 classes")
        self.n_classes = int(n_classes)
        self.class_names = _class_names(class_names, self.n_classes)
        self.probabilities = probabilities
        self._names_given = class_names is not None
        self._confusion = _Confusion(self.n_classes)
        self._wrong_confidence = np.zeros(self.n_classes, dtype=np.float64)
        self._n_samples = 0

    @property
    def n_samples(self) -> int:
        """Number of rows added so far."""
        return self._n_samples

    def update(self, labels: Any, teacher_outputs: Any) -> None:
        """Add one chunk: ``labels`` of shape (n,), ``teacher_outputs`` of shape (n, K)."""
        self._ingest(labels, teacher_outputs)

    def merge(self, other: BiasAccumulator) -> None:
        """Add the counts of another accumulator of the same classes."""
        self._confusion.merge(other._confusion)
        self._wrong_confidence += other._wrong_confidence
        self._n_samples += other._n_samples

    def report(self) -> BiasReport:
        """Return the aggregate :class:`BiasReport` of all chunks added so far."""
        if self.n_samples == 0:
            raise DataError("no rows added yet; call update(labels, teacher_outputs) first")
        return _report(self._confusion, self._wrong_confidence, self.class_names)

    def _ingest(
        self, labels: Any, teacher_outputs: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Validate and add one chunk; return its labels, predictions, confidence and wrong."""
        outputs = _as_outputs(teacher_outputs)
        if outputs.shape[1] != self.n_classes:
            raise DataError(
                f"teacher_outputs has {outputs.shape[1]} columns but there are "
                f"{self.n_classes} classes; pass one column per class"
            )
        offset = self.n_samples
        y = _label_indices(
            labels,
            self.class_names if self._names_given else None,
            n_rows=outputs.shape[0],
            n_classes=self.n_classes,
            row_offset=offset,
        )
        scan = _scan(outputs, probabilities=self.probabilities, row_offset=offset, labels=y)
        self._confusion.add(scan.codes)
        self._wrong_confidence += scan.wrong_confidence
        self._n_samples += len(y)
        return y, scan.pred, scan.conf, scan.wrong


def decompose(
    labels: Any,
    teacher_outputs: Any,
    *,
    class_names: Sequence[str] | None = None,
    probabilities: bool = False,
) -> BiasReport:
    """Split a labelled data set into the teacher's right and wrong samples and summarise.

    Parameters
    ----------
    labels : array-like, shape (N,)
        Ground truth: class indices ``0..K-1``, or class names (then ``class_names`` is
        required).
    teacher_outputs : array-like, shape (N, K)
        The teacher's logits, or probabilities if ``probabilities=True``. Read in place.
    class_names : sequence of str, optional
        One name per column; defaults to ``"0"`` ... ``"K-1"``.
    probabilities : bool, default False
        True when ``teacher_outputs`` already holds probabilities (each in [0, 1]).

    Returns
    -------
    BiasReport
        Per-sample ``labels``, ``predicted``, ``confidence``, ``wrong`` and the aggregates.

    Raises
    ------
    DataError
        Empty input, ``teacher_outputs`` not 2-D or with fewer than 2 columns, row counts that
        differ, a label outside the classes, or a NaN/inf (or, for probabilities, a value
        outside [0, 1]) in ``teacher_outputs``.
    """
    outputs = _as_outputs(teacher_outputs)
    accumulator = BiasAccumulator(
        outputs.shape[1], class_names=class_names, probabilities=probabilities
    )
    y, pred, conf, wrong = accumulator._ingest(labels, outputs)
    return replace(accumulator.report(), labels=y, predicted=pred, confidence=conf, wrong=wrong)


def reliability(confidence: Any, correct: Any, *, n_bins: int = 10) -> pd.DataFrame:
    """Tabulate confidence against accuracy in equal-width bins, for a reliability diagram.

    Parameters
    ----------
    confidence : array-like of float, shape (N,)
        Top probability per sample, in [0, 1] (e.g. ``report.confidence``).
    correct : array-like of bool, shape (N,)
        Whether each prediction was right (e.g. ``~report.wrong``).
    n_bins : int, default 10
        Number of bins splitting [0, 1]; bin i is ``[i/n_bins, (i+1)/n_bins)``, the last one
        closed.

    Returns
    -------
    pd.DataFrame
        One row per bin (empty bins included) with columns ``bin_lower``, ``bin_upper``,
        ``count``, ``mean_confidence`` and ``accuracy`` (both NaN for an empty bin).
    """
    conf = np.asarray(confidence, dtype=np.float64)
    right = np.asarray(correct, dtype=bool)
    if n_bins < 1:
        raise DataError(f"n_bins is {n_bins}; pass a positive number of bins")
    if conf.ndim != 1 or right.ndim != 1:
        raise DataError(
            f"confidence and correct must be 1-D, got shapes {conf.shape} and {right.shape}"
        )
    if conf.shape[0] != right.shape[0]:
        raise DataError(
            f"confidence has {conf.shape[0]} rows but correct has {right.shape[0]}; "
            "pass one flag per confidence"
        )
    if conf.shape[0] == 0:
        raise DataError("confidence is empty; pass at least one sample")
    row = _first(~((conf >= 0) & (conf <= 1)))
    if row is not None:
        raise DataError(
            f"confidence[{row}] = {conf[row]} is not in [0, 1]; pass probabilities, not logits"
        )
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bins, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(bins, weights=right, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame(
        {
            "bin_lower": edges[:-1],
            "bin_upper": edges[1:],
            "count": count,
            "mean_confidence": mean_confidence,
            "accuracy": accuracy,
        }
    )


def predicted_distribution(
    teacher_outputs: Any,
    *,
    class_names: Sequence[str] | None = None,
    probabilities: bool = False,
) -> pd.DataFrame:
    """Count the teacher's predicted classes on an unlabelled split.

    Parameters
    ----------
    teacher_outputs : array-like, shape (N, K)
        Logits, or probabilities if ``probabilities=True``. Validated as in :func:`decompose`.
    class_names : sequence of str, optional
        One name per column; defaults to ``"0"`` ... ``"K-1"``.

    Returns
    -------
    pd.DataFrame
        One row per class with columns ``class``, ``count`` (samples whose argmax is that
        class) and ``share`` (count / N).
    """
    outputs = _as_outputs(teacher_outputs)
    n, k = outputs.shape
    names = _class_names(class_names, k)
    count = np.bincount(_scan(outputs, probabilities=probabilities).pred, minlength=k)
    return pd.DataFrame({"class": names, "count": count, "share": count / n})


def softmax(outputs: np.ndarray, probabilities: bool = False) -> np.ndarray:
    """Row-normalised probabilities of logits (or of given probabilities), float64."""
    z = np.array(outputs, dtype=np.float64)  # one copy, worked on in place
    if probabilities:
        np.clip(z, 0.0, None, out=z)
        z /= np.clip(z.sum(1, keepdims=True), 1e-12, None)
        return z
    z -= z.max(1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(1, keepdims=True)
    return z


def softened(outputs: Any, *, probabilities: bool = False, temperature: float = 1.0
             ) -> np.ndarray:
    """The teacher's distribution at a temperature, ``softmax(z / T)``, as a student sees it in
    distillation. Probabilities ``p`` are read as the logits ``log p`` (``p`` below
    ``_MIN_PROBABILITY`` as that, as for a tabular teacher's)."""
    z = np.asarray(outputs, dtype=np.float64)
    if probabilities:
        z = np.log(np.maximum(z, _MIN_PROBABILITY))
    return softmax(z / temperature)


def rectified(probs: Any, labels: Any) -> np.ndarray:
    """Swap rectification (docs/method.md 3) of probabilities: in each row the teacher's top class
    and the true class trade probabilities, every other class keeps its own.

    A permutation commutes with softmax, so ``rectified(softened(z, temperature=T), y)`` is the
    target that ``+br`` distils, ``softmax(swap_rectify(z, y) / T)``, without torch. Rows the
    teacher gets right are unchanged.
    """
    p = np.array(probs, dtype=np.float64)
    rows = np.arange(len(p))
    labels = np.asarray(labels, dtype=np.int64)
    top = p.argmax(axis=1)
    p[rows, labels], p[rows, top] = p[rows, top], p[rows, labels]
    return p


def count_confusion(true: Any, predicted: Any, n_classes: int) -> Any:
    """Count (true, predicted) pairs of class indices: a dense (K, K) int64 array, or above
    ``SPARSE_CONFUSION_CLASSES`` classes a ``scipy.sparse.coo_array`` of the nonzero cells, so
    no K x K array is made for many classes."""
    codes = np.asarray(true, dtype=np.int64) * n_classes + np.asarray(predicted, dtype=np.int64)
    confusion = _Confusion(n_classes)
    confusion.add(codes)
    return _matrix(*confusion.cells(), n_classes)


def confusion_cells(confusion: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The nonzero cells of a dense confusion or a scipy sparse one, as int64 arrays
    ``(true, predicted, count)`` ordered by true then predicted class."""
    if hasattr(confusion, "tocoo"):
        coo = confusion.tocoo()
        coo.sum_duplicates()
        true, predicted, count = (np.asarray(a, dtype=np.int64)
                                  for a in (coo.row, coo.col, coo.data))
        keep = count != 0
        order = np.lexsort((predicted[keep], true[keep]))
        return true[keep][order], predicted[keep][order], count[keep][order]
    dense = np.asarray(confusion)
    true, predicted = np.nonzero(dense)
    return true, predicted, dense[true, predicted].astype(np.int64)


def confusion_json(confusion: Any) -> list:
    """A confusion for JSON: a dense one as nested lists (K x K), a sparse one as
    ``[[true, predicted, count], ...]`` for its nonzero cells (see :func:`confusion_cells`)."""
    if hasattr(confusion, "tocoo"):
        return np.stack(confusion_cells(confusion), axis=1).tolist()
    return np.asarray(confusion).tolist()


def _as_outputs(teacher_outputs: Any) -> np.ndarray:
    """Return ``teacher_outputs`` as a 2-D float array (no copy for a float ndarray)."""
    outputs = np.asarray(teacher_outputs)
    if outputs.dtype.kind in "biu":
        outputs = outputs.astype(np.float64)
    if outputs.dtype.kind != "f":
        raise DataError(
            f"teacher_outputs has dtype {outputs.dtype}; pass numeric logits or probabilities"
        )
    if outputs.ndim != 2:
        raise DataError(
            f"teacher_outputs has shape {outputs.shape}; pass a 2-D array (n_samples, n_classes)"
        )
    if outputs.shape[0] == 0:
        raise DataError("teacher_outputs has no rows; pass at least one sample")
    if outputs.shape[1] < 2:
        raise DataError(
            f"teacher_outputs has {outputs.shape[1]} column(s); pass one column per class, "
            "at least 2"
        )
    return outputs


def _class_names(class_names: Sequence[str] | None, n_classes: int) -> list[str]:
    """Return ``class_names`` as a list of K distinct strings, defaulting to "0".."K-1"."""
    if class_names is None:
        return [str(i) for i in range(n_classes)]
    names = [str(name) for name in class_names]
    if len(names) != n_classes:
        raise DataError(
            f"class_names has {len(names)} names but there are {n_classes} classes; "
            "pass one name per column of teacher_outputs"
        )
    if len(set(names)) != len(names):
        raise DataError("class_names has duplicates; pass one distinct name per class")
    return names


def _label_indices(
    labels: Any,
    class_names: list[str] | None,
    *,
    n_rows: int,
    n_classes: int,
    row_offset: int = 0,
) -> np.ndarray:
    """Return labels as int64 indices in ``0..n_classes-1``, mapping names via class_names."""
    raw = np.asarray(labels)
    if raw.ndim != 1:
        raise DataError(f"labels has shape {raw.shape}; pass a 1-D array, one label per row")
    if raw.shape[0] != n_rows:
        raise DataError(
            f"labels has {raw.shape[0]} rows but teacher_outputs has {n_rows}; "
            "pass one label per row of teacher_outputs"
        )
    kind = pd.api.types.infer_dtype(raw, skipna=False) if raw.dtype.kind == "O" else ""
    if raw.dtype.kind in "US" or kind == "string":
        return _indices_from_names(raw, class_names, row_offset=row_offset)
    if raw.dtype.kind == "f" or kind in ("floating", "mixed-integer-float"):
        values = raw.astype(np.float64)
        row = _first(~(np.isfinite(values) & (values == np.round(values))))
        if row is not None:
            raise DataError(
                f"labels row {row + row_offset} is {values[row]}; pass whole class indices"
            )
        raw = values
    elif raw.dtype.kind not in "biu" and kind not in ("integer", "boolean"):
        raise DataError(
            f"labels are of type {kind or raw.dtype}; pass class indices or class names"
        )
    indices = raw.astype(np.int64)
    row = _first((indices < 0) | (indices >= n_classes))
    if row is not None:
        raise DataError(
            f"labels row {row + row_offset} is {indices[row]}, outside 0..{n_classes - 1}; "
            "pass class indices matching the columns of teacher_outputs"
        )
    return indices


def _indices_from_names(
    names: np.ndarray, class_names: list[str] | None, *, row_offset: int
) -> np.ndarray:
    """Map string labels to their position in ``class_names``."""
    if class_names is None:
        raise DataError("labels are class names; pass class_names to map them to columns")
    indices = pd.Index(class_names).get_indexer(names.astype(str)).astype(np.int64)
    row = _first(indices < 0)
    if row is not None:
        raise DataError(
            f"labels row {row + row_offset} is {str(names[row])!r}, not one of class_names; "
            "fix the label or add the class"
        )
    return indices


@dataclass
class _Scan:
    """What one pass over the teacher's outputs yields (the label-dependent fields need labels)."""

    pred: np.ndarray  # int64 argmax per row
    conf: np.ndarray  # top probability per row
    wrong: np.ndarray | None = None  # pred != label
    codes: np.ndarray | None = None  # true * K + predicted per row
    wrong_confidence: np.ndarray | None = None  # (K,) sum of conf over wrong rows, by true class


def _scan(
    outputs: np.ndarray, *, probabilities: bool, row_offset: int = 0,
    labels: np.ndarray | None = None,
) -> _Scan:
    """Return the teacher's argmax and top probability per row, validating as it goes.

    With ``labels`` (int64 indices) the same pass also marks the wrong rows and codes each
    row's (true, predicted) pair for the confusion.

    Works through ``outputs`` in blocks of rows, each thread with one scratch block, so memory
    beyond the (N,) results is one block a thread. Large inputs use up to ``_THREADS`` threads
    (NumPy releases the GIL in these loops) that take the next block as they finish one, so a
    thread slowed by another process does fewer blocks instead of holding the others up. For
    logits the top probability is ``exp(max z) / sum(exp(z))``.
    """
    n, k = outputs.shape
    work = np.result_type(outputs.dtype, np.float32)
    scan = _Scan(np.empty(n, dtype=np.intp), np.empty(n, dtype=work))
    codes = None  # true * K + predicted, counted by the caller (K*K bins may be many)
    if labels is not None:
        scan.wrong = np.empty(n, dtype=bool)
        codes = np.empty(n, dtype=np.int32 if k * k < 2**31 else np.int64)
    step = max(1, _CHUNK_VALUES // k)
    blocks = itertools.count()  # next() is atomic under the GIL: each block goes to one thread
    failures: list[tuple[int, DataError]] = []

    def worker() -> np.ndarray:
        scanner = _BlockScanner(outputs, scan, labels, codes, min(step, n),
                                probabilities=probabilities)
        while not failures:
            start = next(blocks) * step
            if start >= n:
                break
            try:
                scanner.fill(start, min(start + step, n), row_offset=row_offset)
            except DataError as exc:
                failures.append((start, exc))
        return scanner.wrong_confidence

    threads = max(1, min(_THREADS, n * k // _PARALLEL_VALUES))
    if threads == 1:
        sums = [worker()]
    else:
        with ThreadPoolExecutor(threads) as pool:
            sums = [f.result() for f in [pool.submit(worker) for _ in range(threads)]]
    if failures:  # blocks are taken in order, so the earliest failure has the first bad row
        raise min(failures, key=lambda failure: failure[0])[1]
    scan.pred = scan.pred.astype(np.int64, copy=False)
    if labels is not None:
        scan.codes = codes
        scan.wrong_confidence = sum(sums)
    return scan


class _BlockScanner:
    """One thread's share of :func:`_scan`: its scratch block and its per-class sums."""

    def __init__(self, outputs: np.ndarray, scan: _Scan, labels: np.ndarray | None,
                 codes: np.ndarray | None, rows: int, *, probabilities: bool) -> None:
        self.outputs, self.scan, self.labels, self.codes = outputs, scan, labels, codes
        self.probabilities = probabilities
        k = outputs.shape[1]
        self.scratch = np.empty((rows, k), dtype=scan.conf.dtype)
        self.row_starts = np.arange(rows) * k  # flat index of each row's first value
        self.flat_index = np.empty(rows, dtype=np.intp)
        self.wrong_confidence = np.zeros(k, dtype=np.float64)

    def fill(self, lo: int, hi: int, *, row_offset: int) -> None:
        """Fill rows ``lo:hi`` of the scan and add them to this thread's sums."""
        block, rows = self.outputs[lo:hi], slice(lo, hi)
        conf = self.scan.conf[rows]
        top_index = np.argmax(block, axis=1, out=self.scan.pred[rows])
        # each row's value at its argmax, by flat index (twice as fast as block[rows, cols])
        at_top = np.add(self.row_starts[: hi - lo], top_index, out=self.flat_index[: hi - lo])
        top = block.reshape(-1).take(at_top)
        if self.probabilities:
            _check_block(block, top, first_row=lo + row_offset, probabilities=True)
            np.minimum(top, 1, out=conf)
        else:
            # One test covers NaN and inf (a NaN top fails both comparisons) and the rows too
            # large or small for the unshifted powers below.
            safe = -_SAFE_EXP <= top.min() and top.max() <= _SAFE_EXP
            if not safe:
                _check_block(block, top, first_row=lo + row_offset, probabilities=False)
            # conf = exp(top) / sum(exp(z)), with exp(x) = 2^(x log2 e): NumPy's exp2 is twice
            # as fast as its exp, and without the usual shift by the max it is one pass fewer.
            # The row sums use einsum, not a matrix product: OpenBLAS would start threads of
            # its own inside each of ours (3-5x slower at some block sizes).
            # Within 3e-6 (relative) of a float64 softmax (tests/test_bias.py).
            powers = self.scratch[: hi - lo]
            with np.errstate(all="ignore"):  # the rows this can overflow are redone below
                np.multiply(block, _LOG2_E, out=powers)
                np.exp2(powers, out=powers)
                # the numerator is a term of the sum itself, so conf <= 1 despite rounding
                np.divide(powers.reshape(-1).take(at_top), np.einsum("ij->i", powers), out=conf)
            if not safe:  # rare: shift those rows by their max first
                extreme = np.flatnonzero(np.abs(top) > _SAFE_EXP)
                conf[extreme] = 1 / np.exp(block[extreme] - top[extreme, None]).sum(axis=1)
        if self.labels is not None:
            k = block.shape[1]
            y, codes = self.labels[rows], self.codes[rows]
            wrong = np.not_equal(top_index, y, out=self.scan.wrong[rows])
            np.multiply(y, k, out=codes, casting="unsafe")
            np.add(codes, top_index, out=codes, casting="unsafe")
            self.wrong_confidence += np.bincount(y, weights=conf * wrong, minlength=k)


def _check_block(
    block: np.ndarray, top: np.ndarray, *, first_row: int, probabilities: bool
) -> None:
    """Raise a DataError naming the first invalid row of ``block``, if there is one.

    Logits must be finite; probabilities must lie in [0, 1]. ``top`` is each row's value at its
    argmax (its max, or NaN if it holds one). The whole block is tested at once; rows are only
    searched once that test fails.
    """
    if probabilities:
        if (block >= 0).all() and (top <= 1 + _PROBABILITY_SLACK).all():
            return
        row = first_row + int(np.argmax(~((block >= 0) & (block <= 1 + _PROBABILITY_SLACK)).all(1)))
        raise DataError(
            f"teacher_outputs row {row} is not a probability vector (values must be finite and "
            "in [0, 1]); pass probabilities=False if these are logits"
        )
    # A row's max is NaN if it holds a NaN (argmax stops at it) and inf if it holds +inf, so
    # checking the maxima checks every value at no extra pass. A -inf logit is a probability
    # of 0 (a masked class) and is allowed; a row of only -inf is not.
    if np.isfinite(top).all():
        return
    row = first_row + int(np.argmax(~np.isfinite(top)))
    raise DataError(
        f"teacher_outputs row {row} holds NaN or inf; drop that row or recompute its logits"
    )


def _first(flags: np.ndarray) -> int | None:
    """Return the index of the first True in 1-D ``flags``, or None if there is none."""
    return int(np.argmax(flags)) if flags.any() else None


def _report(
    confusion: _Confusion, wrong_confidence: np.ndarray, class_names: list[str]
) -> BiasReport:
    """Build the aggregate BiasReport from the confusion counts and per-class sums.

    Works on the nonzero cells only, so it costs no K x K array above
    ``SPARSE_CONFUSION_CLASSES`` classes.
    """
    k = len(class_names)
    true, predicted, count = confusion.cells()
    right = true == predicted
    support = np.bincount(true, weights=count, minlength=k).astype(np.int64)
    correct = np.bincount(true[right], weights=count[right], minlength=k).astype(np.int64)
    true, predicted, count = true[~right], predicted[~right], count[~right]
    n_wrong = support - correct
    total_wrong = int(n_wrong.sum())
    names = np.asarray(class_names, dtype=object)
    # each class's most frequent wrong prediction (ties: the lowest class index)
    by_class = np.lexsort((predicted, -count, true))
    first = by_class[np.diff(true[by_class], prepend=-1) != 0]
    most_confused = np.full(k, None, dtype=object)
    most_confused[true[first]] = names[predicted[first]]
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = pd.DataFrame(
            {
                "class": list(class_names),
                "support": support,
                "teacher_accuracy": correct / support,
                "bias_rate": n_wrong / support,
                "most_confused_with": pd.Series(most_confused, dtype=object),
                "mean_confidence_wrong": wrong_confidence / n_wrong,
                "share_of_errors": n_wrong / total_wrong if total_wrong else np.nan,
            }
        )
    order = np.lexsort((predicted, true, -count))
    top_confusions = pd.DataFrame(
        {
            "true": names[true[order]].astype(str),
            "predicted": names[predicted[order]].astype(str),
            "count": count[order],
            "share": count[order] / max(total_wrong, 1),
        }
    )
    n = int(support.sum())
    return BiasReport(
        class_names=list(class_names),
        labels=None,
        predicted=None,
        confidence=None,
        wrong=None,
        error_confusion=_matrix(true, predicted, count, k),
        per_class=per_class,
        top_confusions=top_confusions,
        accuracy=float(correct.sum() / n),
    )


class _Confusion:
    """Counts of (true, predicted) pairs, added as codes ``true * K + predicted``.

    Up to ``SPARSE_CONFUSION_CLASSES`` classes a dense (K, K) array; above, only the nonzero
    cells (sorted codes and their counts), so memory follows the distinct pairs seen, never
    K x K.
    """

    def __init__(self, n_classes: int) -> None:
        self.k = n_classes
        self.dense = (np.zeros((n_classes, n_classes), dtype=np.int64)
                      if n_classes <= SPARSE_CONFUSION_CLASSES else None)
        self._codes = np.zeros(0, dtype=np.int64)  # merged cells, sorted
        self._counts = np.zeros(0, dtype=np.int64)
        self._waiting: list[tuple[np.ndarray, np.ndarray]] = []  # cells not merged yet
        self._n_waiting = 0

    def add(self, codes: np.ndarray) -> None:
        """Count one pair per code."""
        if self.dense is not None:
            k = self.k
            self.dense += np.bincount(codes, minlength=k * k).reshape(k, k)
        else:
            self._add_cells(*np.unique(codes.astype(np.int64, copy=False), return_counts=True))

    def merge(self, other: _Confusion) -> None:
        """Add another confusion's counts (the same classes)."""
        if self.dense is not None:
            self.dense += other.dense
        else:
            self._add_cells(*other._merged())

    def cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The nonzero cells as int64 arrays (true, predicted, count), by true then predicted."""
        if self.dense is not None:
            true, predicted = np.nonzero(self.dense)
            return true, predicted, self.dense[true, predicted]
        codes, counts = self._merged()
        true, predicted = np.divmod(codes, self.k)
        return true, predicted, counts

    def _add_cells(self, codes: np.ndarray, counts: np.ndarray) -> None:
        self._waiting.append((codes, counts))
        self._n_waiting += len(codes)
        if self._n_waiting > max(_COMPACT_CELLS, len(self._codes)):
            self._merged()

    def _merged(self) -> tuple[np.ndarray, np.ndarray]:
        """Merge the waiting cells into the sorted ones; return those."""
        if self._waiting:
            codes = np.concatenate([self._codes, *(c for c, _ in self._waiting)])
            counts = np.concatenate([self._counts, *(n for _, n in self._waiting)])
            order = np.argsort(codes, kind="stable")
            codes, counts = codes[order], counts[order]
            starts = np.flatnonzero(np.diff(codes, prepend=-1) != 0)
            self._codes = codes[starts]
            self._counts = np.add.reduceat(counts, starts) if len(starts) else counts
            self._waiting, self._n_waiting = [], 0
        return self._codes, self._counts


def _matrix(true: np.ndarray, predicted: np.ndarray, count: np.ndarray, n_classes: int) -> Any:
    """Distinct cells as a dense (K, K) int64 array, or above ``SPARSE_CONFUSION_CLASSES``
    classes a ``scipy.sparse.coo_array`` (imported only then)."""
    if n_classes <= SPARSE_CONFUSION_CLASSES:
        dense = np.zeros((n_classes, n_classes), dtype=np.int64)
        dense[true, predicted] = count
        return dense
    from scipy import sparse

    return sparse.coo_array((count, (true, predicted)), shape=(n_classes, n_classes))


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Return ``frame``'s rows as dicts of plain Python values (NaN -> None)."""
    columns = list(frame.columns)
    return [
        {column: _plain(value) for column, value in zip(columns, row, strict=True)}
        for row in frame.itertuples(index=False, name=None)
    ]


def _plain(value: Any) -> Any:
    """Return a numpy scalar as the Python equivalent, with NaN as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
