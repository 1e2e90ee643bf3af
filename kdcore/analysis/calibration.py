"""Can a model's confidence be trusted? ECE, NLL and Brier score, and a reliability table.

Pure numpy, on probabilities (rows summing to 1) and integer labels: what ``compare`` reports
for the teacher and every student. Bins are equal-width on the top-class confidence,
bin i being ``[i/bins, (i+1)/bins)`` with the last one closed, the same rule as
:func:`kdcore.analysis.bias.reliability`, so the two diagrams agree.
"""

from __future__ import annotations

import numpy as np

from kdcore.analysis.bias import softmax
from kdcore.errors import DataError

EPS = 1e-12  # NLL clips p[label] here, so one confident mistake costs ~27.6 nats, not infinity
BINS = 15

__all__ = ["BINS", "calibration", "probabilities", "reliability"]


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax of logits, row by row (float64)."""
    return softmax(logits)


def _checked(probs: np.ndarray, labels: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if bins < 1:
        raise DataError(f"bins is {bins}; pass a positive number of bins")
    if p.ndim != 2 or y.ndim != 1 or p.shape[0] != y.shape[0]:
        raise DataError(f"probabilities of shape {p.shape} and labels of shape {y.shape} do not "
                        "match; pass one row of class probabilities per label")
    if p.shape[0] == 0:
        raise DataError("no samples; pass at least one row of probabilities")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise DataError(f"labels must be class indices in 0..{p.shape[1] - 1}; got "
                        f"{y.dtype} in [{y.min()}, {y.max()}]")
    return p, y.astype(np.int64)


def _binned(p: np.ndarray, y: np.ndarray, bins: int):
    """Per bin: count, summed confidence and summed correctness of the top class."""
    conf = p.max(1)
    right = (p.argmax(1) == y).astype(np.float64)
    index = np.minimum((conf * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    return (count, np.bincount(index, weights=conf, minlength=bins),
            np.bincount(index, weights=right, minlength=bins))


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict:
    """``ece``, ``nll`` and ``brier`` of class probabilities against labels.

    - ECE: over equal-width bins of the top-class confidence, sum of (bin count / n) x
      |accuracy - mean confidence| in the bin;
    - NLL: mean of -log p[label], p clipped at ``EPS`` so one hard zero cannot make it infinite;
    - Brier: per sample, the sum over classes of (p - one-hot label)^2, then the mean (so it
      lies in [0, 2]).
    """
    p, y = _checked(probs, labels, bins)
    n = len(y)
    count, conf, right = _binned(p, y, bins)
    ece = float(np.abs(right - conf).sum() / n)  # sum_b n_b/n |acc_b - conf_b|
    nll = float(-np.log(np.clip(p[np.arange(n), y], EPS, None)).mean())
    onehot = np.zeros_like(p)
    onehot[np.arange(n), y] = 1.0
    brier = float(((p - onehot) ** 2).sum(1).mean())
    return {"ece": ece, "nll": nll, "brier": brier}


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict:
    """A reliability diagram as lists (JSON-ready), one entry per bin, empty bins included:
    ``bin_lower``, ``bin_upper``, ``confidence`` and ``accuracy`` (None for an empty bin),
    ``count``."""
    p, y = _checked(probs, labels, bins)
    count, conf, right = _binned(p, y, bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {
        "bin_lower": [float(e) for e in edges[:-1]],
        "bin_upper": [float(e) for e in edges[1:]],
        "confidence": [float(c / k) if k else None for c, k in zip(conf, count, strict=True)],
        "accuracy": [float(r / k) if k else None for r, k in zip(right, count, strict=True)],
        "count": [int(k) for k in count],
    }
