"""A finished run's saved test predictions (``test_predictions.npz``), read once.

``compare``'s calibration and error map, the before/after table and the Results page all read
the same files, often several times per page rerun; a small cache keyed by the run and the
file's stamp (modification time and size) keeps that to one read, and a file written again
(a run trained again under the same id) is read again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from kdcore.errors import DataError
from kdcore.store.runs import Run, RunStore

FILE = "test_predictions.npz"
CACHE_BYTES = 256 * 2**20  # arrays kept in memory; the oldest read is dropped beyond it

_cache: OrderedDict[tuple, TestPredictions] = OrderedDict()
_lock = threading.Lock()


@dataclass(frozen=True)
class TestPredictions:
    """The student's and the teacher's test logits (n x K), the test labels (n,) and the class
    names (K), as saved by ``kdcore.learning.train.save_artifacts``. Arrays are read-only:
    they are shared through the cache."""

    __test__ = False  # not a pytest test class, despite the name

    logits: np.ndarray
    labels: np.ndarray
    teacher_logits: np.ndarray
    class_names: list[str]


def load_test_predictions(store: RunStore, run: Run) -> TestPredictions:
    """``run``'s test predictions; raises one-line DataError when the file is missing, unreadable
    or inconsistent (naming the file and the fix: train the run again)."""
    path = store.artifact_dir(run.id) / FILE
    fix = "train the run again"
    try:
        stat = path.stat()
    except OSError:
        raise DataError(f"run {run.id} has no saved test predictions ({path}); {fix}") from None
    key = (run.id, stat.st_mtime_ns, stat.st_size)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    try:
        with np.load(path, allow_pickle=False) as npz:
            logits, labels, teacher = (np.asarray(npz[k]) for k in
                                       ("logits", "labels", "teacher_logits"))
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {path} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'damaged'}); {fix}") from None
    n = len(labels)
    if (logits.ndim != 2 or teacher.ndim != 2 or labels.ndim != 1 or logits.shape[0] != n
            or teacher.shape != logits.shape or not np.issubdtype(labels.dtype, np.integer)
            or (n and (labels.min() < 0 or labels.max() >= logits.shape[1]))):
        raise DataError(f"{path} holds logits {logits.shape}, teacher_logits {teacher.shape} and "
                        f"labels {labels.shape} ({labels.dtype}) that do not match; {fix}")
    names = [str(c) for c in (run.metrics.get("per_class_accuracy") or {})]
    if len(names) != logits.shape[1]:
        names = [str(c) for c in range(logits.shape[1])]
    for array in (logits, labels, teacher):
        array.flags.writeable = False
    found = TestPredictions(logits, labels, teacher, names)
    with _lock:
        _cache[key] = found
        while sum(_nbytes(v) for v in _cache.values()) > CACHE_BYTES:
            _cache.popitem(last=False)
    return found


def _nbytes(found: TestPredictions) -> int:
    return found.logits.nbytes + found.teacher_logits.nbytes + found.labels.nbytes
