"""Time kdcore.analysis.bias.decompose on 1,000,000 x 100 float32 logits.

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

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix
from timing import interleaved, ratio  # benchmarks/timing.py, next to this script

from kdcore.analysis.bias import decompose

N_SAMPLES = 1_000_000
N_CLASSES = 100
SEED = 0
ROUNDS = 7


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

    t = interleaved({
        "decompose": lambda: decompose(labels, logits),
        "sklearn": lambda: sklearn_summary(labels, logits),
        "max": lambda: np.max(logits, axis=1),
        "sum": lambda: logits.sum(),
    }, ROUNDS)
    best = {name: min(times) for name, times in t.items()}
    print(f"{ROUNDS} interleaved rounds; times are the best round, ratios the median round "
          "[range]")
    print(f"decompose                                   {best['decompose']:8.3f} s")
    r = ratio(t, "sklearn", "decompose")
    print(f"sklearn argmax+confusion_matrix+report      {best['sklearn']:8.3f} s"
          f"   decompose is {r[0]:.1f}x faster [{r[1]:.1f}-{r[2]:.1f}] (target >= 4)")
    r = ratio(t, "decompose", "sum")
    print(f"read pass logits.sum()                      {best['sum']:8.3f} s"
          f"   decompose / read = {r[0]:.1f}x [{r[1]:.1f}-{r[2]:.1f}] (target <= 5)")
    r = ratio(t, "decompose", "max")
    print(f"read pass np.max(logits, axis=1)            {best['max']:8.3f} s"
          f"   decompose / read = {r[0]:.1f}x [{r[1]:.1f}-{r[2]:.1f}]")
    print(f"peak RSS at end: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
