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


def error_map(student_pred: np.ndarray, teacher_pred: np.ndarray,
              labels: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of the samples both get wrong (``both_wrong``), the student fixes (teacher
    wrong, student right: ``fixed``) and the student newly breaks (teacher right, student wrong:
    ``newly_wrong``). both_wrong + fixed are the teacher's errors, both_wrong + newly_wrong the
    student's."""
    student_wrong = np.asarray(student_pred) != np.asarray(labels)
    teacher_wrong = np.asarray(teacher_pred) != np.asarray(labels)
    return {"both_wrong": student_wrong & teacher_wrong,
            "fixed": teacher_wrong & ~student_wrong,
            "newly_wrong": student_wrong & ~teacher_wrong}


def no_spread(diffs: np.ndarray) -> bool:
    """True when the differences cannot carry an interval: fewer than 2, or all equal (up to
    float rounding), where a t-interval would have zero width and read as certainty."""
    diffs = np.asarray(diffs, float)
    return len(diffs) < 2 or float(np.ptp(diffs)) <= 1e-12


def paired_difference(values: np.ndarray, baseline: np.ndarray, level: float = 0.95) -> dict:
    """Mean of per-seed differences and its t-interval at ``level`` (95% by default); the
    interval is None with fewer than 2 seeds or zero variance (:func:`no_spread`)."""
    diffs = np.asarray(values, float) - np.asarray(baseline, float)
    mean = float(diffs.mean())
    if no_spread(diffs):
        return {"mean": mean, "ci95": None}
    quantile = stats.t.ppf(1 - (1 - level) / 2, len(diffs) - 1)
    half = float(quantile * diffs.std(ddof=1) / math.sqrt(len(diffs)))
    return {"mean": mean, "ci95": [mean - half, mean + half]}
