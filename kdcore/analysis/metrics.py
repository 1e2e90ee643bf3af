"""Metrics of a student against labels and its teacher, and the paired comparison of seeds.

Pure numpy/scipy: what training records per run and what ``compare`` summarises over seeds.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def bias_inheritance(student_pred: np.ndarray, teacher_pred: np.ndarray,
                     labels: np.ndarray) -> float:
    """Of the samples the teacher gets wrong, the share the student gets wrong the same way."""
    teacher_wrong = teacher_pred != labels
    if not teacher_wrong.any():
        return float("nan")
    return float((student_pred[teacher_wrong] == teacher_pred[teacher_wrong]).mean())


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy of each class (None for a class without samples), keyed by class name."""
    correct = np.bincount(labels[pred == labels], minlength=len(class_names))
    support = np.bincount(labels, minlength=len(class_names))
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = correct / support
    return {name: (None if support[i] == 0 else float(acc[i]))
            for i, name in enumerate(class_names)}


def paired_difference(values: np.ndarray, baseline: np.ndarray) -> dict:
    """Mean of per-seed differences and its 95% t-interval (NaN-free: None when n < 2)."""
    diffs = np.asarray(values, float) - np.asarray(baseline, float)
    mean = float(diffs.mean())
    if len(diffs) < 2:
        return {"mean": mean, "ci95": None}
    half = float(stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs)))
    return {"mean": mean, "ci95": [mean - half, mean + half]}
