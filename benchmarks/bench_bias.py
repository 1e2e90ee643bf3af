"""Time kdcore.bias.decompose on 1,000,000 x 100 float32 logits.

Run: ``python benchmarks/bench_bias.py``. Compares, best of 3 each, against

* sklearn: argmax, ``confusion_matrix`` and ``classification_report`` on the same arrays;
* one plain read pass over the logits (``np.max(logits, axis=1)`` and ``logits.sum()``).

Prints each time, the ratios, and the process's peak RSS (which shows whether the logits were
copied: they take 400 MB).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

from kdcore.bias import decompose

N_SAMPLES = 1_000_000
N_CLASSES = 100
SEED = 0
REPEATS = 3


def best_of(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Return the fastest of ``repeats`` wall-clock timings of ``fn()``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sklearn_summary(labels: np.ndarray, logits: np.ndarray) -> None:
    predicted = logits.argmax(axis=1)
    confusion_matrix(labels, predicted, labels=np.arange(N_CLASSES))
    classification_report(labels, predicted, labels=np.arange(N_CLASSES), zero_division=0)


def main() -> None:
    rng = np.random.default_rng(SEED)
    labels = rng.integers(0, N_CLASSES, size=N_SAMPLES)
    logits = rng.standard_normal((N_SAMPLES, N_CLASSES), dtype=np.float32)
    logits[np.arange(N_SAMPLES), labels] += 2.5  # a teacher right about half the time
    print(f"logits: {logits.shape} {logits.dtype}, {logits.nbytes / 1e6:.0f} MB")
    print(f"peak RSS after making the data: {peak_rss_mb():.0f} MB")

    report = decompose(labels, logits)
    t_decompose = best_of(lambda: decompose(labels, logits))
    print(f"teacher accuracy {report.accuracy:.4f}, {len(report.top_confusions)} confusion pairs")
    print(f"peak RSS after decompose: {peak_rss_mb():.0f} MB")

    t_sklearn = best_of(lambda: sklearn_summary(labels, logits))
    t_max = best_of(lambda: np.max(logits, axis=1))
    t_sum = best_of(lambda: logits.sum())

    print(f"decompose                                   {t_decompose:8.3f} s")
    print(
        f"sklearn argmax+confusion_matrix+report      {t_sklearn:8.3f} s"
        f"   decompose is {t_sklearn / t_decompose:.1f}x faster"
    )
    print(
        f"read pass np.max(logits, axis=1)            {t_max:8.3f} s"
        f"   decompose / read = {t_decompose / t_max:.1f}x"
    )
    print(
        f"read pass logits.sum()                      {t_sum:8.3f} s"
        f"   decompose / read = {t_decompose / t_sum:.1f}x"
    )
    print(f"peak RSS at end: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
