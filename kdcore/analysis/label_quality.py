"""Trust the label or the teacher? Separate label errors from teacher bias (cleanlab).

The method calls every disagreement between the teacher and the label "teacher bias" and
rectifies the teacher toward the label. Some disagreements are label errors instead: the
teacher is right and rectifying would teach the student the wrong answer. This module marks
each teacher-wrong row as ``teacher_bias`` or ``label_error`` with cleanlab's confident
learning (``cleanlab.filter.find_label_issues``) and its label-quality score
(``cleanlab.rank.get_label_quality_scores``).

Confident learning needs *out-of-sample* predicted probabilities: the probability of row i
must come from a model that did not see row i's label. Where they come from:

* ``cv`` (inputs available: a bundle or a tabular dataset): the product computes them by
  k-fold cross-validation of a logistic regression on the rows' inputs and the labels being
  judged. This model is independent of the teacher, so it does not inherit the teacher's
  systematic bias: a label that the other labelled rows contradict is a label error; a label
  they support, where the teacher still disagrees, is teacher bias. On the bundled sample the
  teacher was trained on the same images (with the vendor's labels), so its own outputs there
  are in-sample and are not used to judge the labels.
* ``teacher_held_out`` (a prediction table's ``test`` rows, no inputs): the teacher's outputs
  on held-out rows are out-of-sample by the table contract. Caveat: a systematic teacher bias
  looks like a label error from the teacher's own point of view, so in this mode confident
  systematic mistakes may be called label errors; prefer inputs (a bundle) where there are any.
* otherwise (``train`` rows of a table without inputs, or a table without a split column):
  there are no held-out predictions, and the assessment says so (``available`` False and a
  ``reason``).

A row is a *likely label error* only when it is teacher-wrong, cleanlab flags its label, and
the out-of-sample model's top class is the teacher's top class (the claim "the teacher is
right here" needs that agreement). Users can override a verdict per sample, by its key
(:func:`sample_keys`); the caller passes the overrides in (they are stored in the workspace),
and they win.

Pure numpy/pandas + scikit-learn + cleanlab; no torch, no store, no streamlit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kdcore.analysis.bias import (
    SPARSE_CONFUSION_CLASSES,
    confusion_json,
    count_confusion,
    softmax,
)

TEACHER_BIAS = "teacher_bias"
LABEL_ERROR = "label_error"
VERDICTS = (TEACHER_BIAS, LABEL_ERROR)

CV_FOLDS = 5
CV_MAX_ROWS = 50_000  # logistic regression CV above this is too slow for an interactive check
MIN_ROWS = 10

METHOD_TEXT = {
    "cv": "cleanlab find_label_issues on {k}-fold cross-validated logistic-regression "
          "probabilities from the inputs",
    "teacher_held_out": "cleanlab find_label_issues on the teacher's held-out outputs",
}
NOTE_TEXT = {
    "cv": "Out-of-sample probabilities computed by the product (independent of the teacher). "
          "A teacher-wrong row is a likely label error when cleanlab flags its label and the "
          "cross-validated model agrees with the teacher's class.",
    "teacher_held_out": "The teacher's own held-out outputs judge the labels: a confident, "
                        "systematic teacher mistake can look like a label error here.",
}
NO_HELD_OUT = ("no held-out predictions: the teacher may have been trained on these rows and "
               "the input has no features to cross-validate; give a bundle (inputs) or the "
               "teacher's outputs on held-out rows (split = test)")


@dataclass
class LabelQuality:
    """Per-row verdicts for labelled rows (arrays aligned with the labels given)."""

    available: bool
    n_classes: int
    class_names: list[str]
    labels: np.ndarray
    teacher_pred: np.ndarray
    reason: str | None = None
    method: str | None = None
    note: str | None = None
    label_quality: np.ndarray | None = None  # cleanlab score, 0 (likely wrong) .. 1
    model_pred: np.ndarray | None = None  # the out-of-sample model's top class
    flagged: np.ndarray | None = None  # cleanlab label issue (any row)
    likely_label_error: np.ndarray = field(default=None)  # teacher-wrong rows only
    overridden: np.ndarray = field(default=None)
    keys: np.ndarray | None = None  # sample keys, for overrides

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.likely_label_error is None:
            self.likely_label_error = np.zeros(n, dtype=bool)
        if self.overridden is None:
            self.overridden = np.zeros(n, dtype=bool)

    @property
    def teacher_wrong(self) -> np.ndarray:
        return self.teacher_pred != self.labels

    @property
    def verdict(self) -> np.ndarray:
        """``teacher_bias`` / ``label_error`` on teacher-wrong rows, ``""`` on right rows."""
        out = np.full(len(self.labels), "", dtype=object)
        wrong = self.teacher_wrong
        out[wrong] = TEACHER_BIAS
        out[wrong & self.likely_label_error] = LABEL_ERROR
        return out

    def apply_overrides(self, overrides: dict[str, str] | None) -> LabelQuality:
        """Set the verdict of teacher-wrong rows whose key has an override (in place)."""
        if not overrides or self.keys is None:
            return self
        rows = [i for i, key in enumerate(self.keys) if str(key) in overrides]
        return self.override_at(rows, [overrides[str(self.keys[i])] for i in rows])

    def override_at(self, rows, verdicts) -> LabelQuality:
        """Set the verdicts of rows ``rows`` (positions) where they are teacher-wrong (in
        place): for a caller that maps the override keys to rows itself (a large table)."""
        wrong = self.teacher_wrong
        for i, verdict in zip(rows, verdicts, strict=True):
            if verdict in VERDICTS and wrong[i]:
                self.likely_label_error[i] = verdict == LABEL_ERROR
                self.overridden[i] = True
        return self

    def take(self, index: np.ndarray) -> LabelQuality:
        """The rows at ``index`` (a permutation or a subset), as a new assessment."""
        def pick(a):
            return None if a is None else np.asarray(a)[index]

        return LabelQuality(
            self.available, self.n_classes, list(self.class_names), self.labels[index],
            self.teacher_pred[index], reason=self.reason, method=self.method, note=self.note,
            label_quality=pick(self.label_quality), model_pred=pick(self.model_pred),
            flagged=pick(self.flagged), likely_label_error=self.likely_label_error[index].copy(),
            overridden=self.overridden[index].copy(), keys=pick(self.keys))

    def per_class_counts(self) -> np.ndarray:
        """Likely label errors per true (given) class."""
        return np.bincount(self.labels[self.likely_label_error], minlength=self.n_classes)

    def label_error_confusion(self) -> Any:
        """Counts of likely label errors, given label x teacher's class: K x K, or sparse above
        SPARSE_CONFUSION_CLASSES classes (:func:`kdcore.analysis.bias.count_confusion`)."""
        return count_confusion(self.labels[self.likely_label_error],
                               self.teacher_pred[self.likely_label_error], self.n_classes)

    def to_dict(self) -> dict:
        """The ``likely_label_errors`` entry of ``kdcore analyze --json``."""
        if not self.available:
            return {"available": False, "reason": self.reason}
        counts = self.per_class_counts()
        return {
            "available": True,
            "count": int(self.likely_label_error.sum()),
            "n_teacher_wrong": int(self.teacher_wrong.sum()),
            "n_overridden": int(self.overridden.sum()),
            "per_class": [{"class": c, "count": int(counts[i])}
                          for i, c in enumerate(self.class_names)],
            "label_error_confusion": confusion_json(self.label_error_confusion()),
            "method": self.method,
            "note": self.note,
        }

    def frame(self) -> pd.DataFrame:
        """One row per labelled sample: key, label, teacher's class, verdict, score, override."""
        return pd.DataFrame({
            "sample_key": self.keys if self.keys is not None else np.arange(len(self.labels)),
            "label": self.labels,
            "teacher_pred": self.teacher_pred,
            "verdict": self.verdict,
            "label_quality": (self.label_quality if self.label_quality is not None
                              else np.full(len(self.labels), np.nan)),
            "overridden": self.overridden,
        })


def sample_keys(n: int, split: str | None, sample_id: np.ndarray | None = None) -> np.ndarray:
    """The override keys of ``n`` rows of one split, in row order: the rows' ``sample_id``
    when the data has one, else ``<split>:<row within the split>`` (``row:<i>`` without a
    split)."""
    if sample_id is not None:
        return np.asarray([str(s) for s in sample_id], dtype=object)
    prefix = split if split else "row"
    return np.asarray([f"{prefix}:{i}" for i in range(n)], dtype=object)


def unavailable(labels: np.ndarray, teacher_pred: np.ndarray, reason: str, *,
                class_names: list[str], keys: np.ndarray | None = None) -> LabelQuality:
    return LabelQuality(False, len(class_names), list(class_names), np.asarray(labels),
                        np.asarray(teacher_pred), reason=reason, keys=keys)


def cross_validated_probabilities(features: np.ndarray, labels: np.ndarray, n_classes: int, *,
                                  folds: int = CV_FOLDS, seed: int = 0) -> np.ndarray:
    """Out-of-sample class probabilities: stratified k-fold logistic regression on ``features``.

    Each row's probabilities come from a model fitted without that row. A class missing from
    a fold's training rows gets a tiny probability; rows are renormalised.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64).reshape(len(labels), -1)
    counts = np.bincount(labels, minlength=n_classes)
    smallest = counts[counts > 0].min()
    k = int(min(folds, len(labels)))
    splitter = (StratifiedKFold(k, shuffle=True, random_state=seed) if smallest >= 2
                else KFold(k, shuffle=True, random_state=seed))
    probs = np.zeros((len(labels), n_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small classes, convergence: the CV result still holds
        for fit_rows, held in splitter.split(x, labels):
            classes = np.unique(labels[fit_rows])
            if len(classes) == 1:
                probs[np.ix_(held, classes)] = 1.0
                continue
            scaler = StandardScaler().fit(x[fit_rows])
            clf = LogisticRegression(max_iter=2000).fit(scaler.transform(x[fit_rows]),
                                                        labels[fit_rows])
            probs[np.ix_(held, clf.classes_)] = clf.predict_proba(scaler.transform(x[held]))
    probs = np.clip(probs, 1e-6, None)
    return probs / probs.sum(1, keepdims=True)


def assess(labels: np.ndarray, teacher_outputs: np.ndarray, *, probabilities: bool = False,
           class_names: list[str] | None = None, features: np.ndarray | None = None,
           held_out: bool = False, method: str = "cleanlab", keys: np.ndarray | None = None,
           overrides: dict[str, str] | None = None, folds: int = CV_FOLDS,
           seed: int = 0) -> LabelQuality:
    """Mark each teacher-wrong labelled row as likely teacher bias or likely label error.

    ``labels`` are class indices (all >= 0); ``teacher_outputs`` logits (or probabilities).
    The out-of-sample probabilities are cross-validated from ``features`` when given, else the
    teacher's outputs when ``held_out`` (they are predictions on rows the teacher never saw);
    with neither the result is ``available=False`` with a ``reason``. ``overrides`` maps a
    sample key (``keys``) to a verdict and wins over the detection.
    """
    if method != "cleanlab":
        raise ValueError(f"label-quality method {method!r}: only 'cleanlab' is available")
    labels = np.asarray(labels, dtype=np.int64)
    outputs = np.asarray(teacher_outputs)
    n_classes = outputs.shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
    teacher_pred = outputs.argmax(1)
    keys = None if keys is None else np.asarray(keys, dtype=object)

    def none(reason: str) -> LabelQuality:
        return unavailable(labels, teacher_pred, reason, class_names=names, keys=keys)

    if features is None and not held_out:
        return none(NO_HELD_OUT)
    if len(labels) < MIN_ROWS:
        return none(f"too few labelled rows ({len(labels)}; at least {MIN_ROWS}) for "
                    "out-of-sample label checks")
    present = np.unique(labels)
    if len(present) < 2:
        return none("every labelled row has the same class; label checks need two or more")
    if len(present) > SPARSE_CONFUSION_CLASSES:  # cleanlab's noise estimates are dense K x K
        return none(f"{len(present):,} classes have labels here; label checks stop at "
                    f"{SPARSE_CONFUSION_CLASSES:,} classes (cleanlab's estimates take memory "
                    "growing with the square of the class count)")
    if features is not None:
        if len(labels) > CV_MAX_ROWS:
            return none(f"{len(labels):,} labelled rows: cross-validating more than "
                        f"{CV_MAX_ROWS:,} is too slow here; analyse a split or a sample")
        kind = "cv"
        pred_probs = cross_validated_probabilities(features, labels, n_classes,
                                                   folds=folds, seed=seed)
    else:
        kind = "teacher_held_out"
        pred_probs = softmax(outputs, probabilities)

    # cleanlab on the classes present (a class without labels has no noise rate to estimate)
    sub_labels = np.searchsorted(present, labels)  # present is sorted: each label's position
    sub_probs = pred_probs[:, present]
    sub_probs = sub_probs / np.clip(sub_probs.sum(1, keepdims=True), 1e-12, None)
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # n_jobs=1: cleanlab otherwise opens a multiprocessing Pool, which forks the
            # (multi-threaded) dashboard server and can deadlock it for good.
            flagged = np.asarray(find_label_issues(sub_labels, sub_probs, n_jobs=1),
                                 dtype=bool)
            scores = np.asarray(get_label_quality_scores(sub_labels, sub_probs), dtype=float)
    except Exception as exc:  # cleanlab refuses data it cannot estimate noise rates on
        return none(f"cleanlab could not assess these rows ({type(exc).__name__}: {exc})")
    model_pred = pred_probs.argmax(1)
    wrong = teacher_pred != labels
    likely = wrong & flagged & (model_pred == teacher_pred)
    k = min(folds, len(labels))
    result = LabelQuality(
        True, n_classes, names, labels, teacher_pred, method=METHOD_TEXT[kind].format(k=k),
        note=NOTE_TEXT[kind], label_quality=scores, model_pred=model_pred, flagged=flagged,
        likely_label_error=likely, keys=keys)
    return result.apply_overrides(overrides)


def concat(parts: list[LabelQuality], class_names: list[str]) -> LabelQuality:
    """Several assessed parts (e.g. one per split) as one, rows in the parts' order.

    Available when any part is; unavailable parts count no label errors and are named in the
    note with their reason.
    """
    live = [p for p in parts if p.available]
    labels = np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int64)
    pred = np.concatenate([p.teacher_pred for p in parts]) if parts else np.zeros(0, np.int64)
    keys = (np.concatenate([p.keys for p in parts])
            if parts and all(p.keys is not None for p in parts) else None)
    if not live:
        reason = parts[0].reason if parts else NO_HELD_OUT
        return unavailable(labels, pred, reason, class_names=class_names, keys=keys)
    if len(live) == len(parts) == 1:
        return parts[0]
    n = [len(p.labels) for p in parts]

    def cat(attr: str, fill) -> np.ndarray:
        return np.concatenate([getattr(p, attr) if p.available and getattr(p, attr) is not None
                               else np.full(m, fill) for p, m in zip(parts, n, strict=True)])

    methods = sorted({p.method for p in live})
    notes = sorted({p.note for p in live})
    skipped = [p.reason for p in parts if not p.available]
    note = " ".join(notes) + ("".join(f" Not assessed: {r}." for r in skipped))
    return LabelQuality(
        True, len(class_names), list(class_names), labels, pred, method="; ".join(methods),
        note=note, label_quality=cat("label_quality", np.nan),
        model_pred=cat("model_pred", -1), flagged=cat("flagged", False),
        likely_label_error=cat("likely_label_error", False),
        overridden=cat("overridden", False), keys=keys)


def split_rates(per_class: pd.DataFrame, lq: LabelQuality) -> pd.DataFrame:
    """``per_class`` with ``label_error_rate`` and ``teacher_bias_rate`` (summing to bias_rate).

    Unavailable: both None (unknown), never a guess.
    """
    out = per_class.copy()
    if not lq.available:
        out["label_error_rate"] = None
        out["teacher_bias_rate"] = None
        return out
    support = np.bincount(lq.labels, minlength=lq.n_classes).astype(float)
    counts = lq.per_class_counts().astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        le = np.where(support > 0, counts / support, np.nan)
    out["label_error_rate"] = le
    out["teacher_bias_rate"] = out["bias_rate"].to_numpy(dtype=float) - le
    return out
