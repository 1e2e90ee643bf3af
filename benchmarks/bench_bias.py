"""Time kdcore.bias.decompose on 1,000,000 x 100 float32 logits.

Run: ``python benchmarks/bench_bias.py``. Compares against

* sklearn: argmax, ``confusion_matrix`` and ``classification_report`` on the same arrays;
* one plain read pass over the logits: ``logits.sum()`` (a SIMD pass at memory bandwidth, the
  floor) and ``np.max(logits, axis=1)`` (a row-wise pass, as any per-row analysis reads).

The contenders run in interleaved rounds, so a slow spell of this shared machine hits each of
them in the same round; each ratio is the median over rounds of that round's ratio, with the
range over rounds. Also prints the process's peak RSS (which shows whether the logits were
copied: they take 400 MB).
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

from kdcore.bias import decompose

N_SAMPLES = 1_000_000
N_CLASSES = 100
SEED = 0
ROUNDS = 7


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one ``fn()``.

    The result is freed after the clock stops: handing tens of MB back to the OS is not part
    of computing them, and on this VM it alone varies by 10-20 ms.
    """
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def rounds(contenders: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Time every contender once per round, ``n`` rounds, one after the other."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(n):
        for name, fn in contenders.items():
            times[name].append(timed(fn))
    return times


def ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median and range over rounds of ``a[i] / b[i]``."""
    per_round = [x / y for x, y in zip(a, b, strict=True)]
    return statistics.median(per_round), min(per_round), max(per_round)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sklearn_summary(labels: np.ndarray, logits: np.ndarray) -> tuple:
    """The nearest scikit-learn gets to decompose: argmax, confusion matrix, per-class report."""
    predicted = logits.argmax(axis=1)
    return (predicted, confusion_matrix(labels, predicted, labels=np.arange(N_CLASSES)),
            classification_report(labels, predicted, labels=np.arange(N_CLASSES),
                                  zero_division=0))


def main() -> None:
    rng = np.random.default_rng(SEED)
    labels = rng.integers(0, N_CLASSES, size=N_SAMPLES)
    logits = rng.standard_normal((N_SAMPLES, N_CLASSES), dtype=np.float32)
    logits[np.arange(N_SAMPLES), labels] += 2.5  # a teacher right about half the time
    print(f"logits: {logits.shape} {logits.dtype}, {logits.nbytes / 1e6:.0f} MB")
    print(f"peak RSS after making the data: {peak_rss_mb():.0f} MB")

    report = decompose(labels, logits)
    print(f"teacher accuracy {report.accuracy:.4f}, {len(report.top_confusions)} confusion pairs")
    print(f"peak RSS after decompose: {peak_rss_mb():.0f} MB")
    del report

    t = rounds({
        "decompose": lambda: decompose(labels, logits),
        "sklearn": lambda: sklearn_summary(labels, logits),
        "max": lambda: np.max(logits, axis=1),
        "sum": lambda: logits.sum(),
    }, ROUNDS)
    best = {name: min(times) for name, times in t.items()}
    print(f"{ROUNDS} interleaved rounds; times are the best round, ratios the median round "
          "[range]")
    print(f"decompose                                   {best['decompose']:8.3f} s")
    r = ratio(t["sklearn"], t["decompose"])
    print(f"sklearn argmax+confusion_matrix+report      {best['sklearn']:8.3f} s"
          f"   decompose is {r[0]:.1f}x faster [{r[1]:.1f}-{r[2]:.1f}] (target >= 4)")
    r = ratio(t["decompose"], t["sum"])
    print(f"read pass logits.sum()                      {best['sum']:8.3f} s"
          f"   decompose / read = {r[0]:.1f}x [{r[1]:.1f}-{r[2]:.1f}] (target <= 5)")
    r = ratio(t["decompose"], t["max"])
    print(f"read pass np.max(logits, axis=1)            {best['max']:8.3f} s"
          f"   decompose / read = {r[0]:.1f}x [{r[1]:.1f}-{r[2]:.1f}]")
    print(f"peak RSS at end: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
