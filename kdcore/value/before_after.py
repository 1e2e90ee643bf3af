"""Before and after, per class: the teacher's test accuracy next to the students'.

One table for the Overview, the Results page and the report, with one averaging rule: a
student's accuracy on a class is the mean over the seeds that recorded that class. The teacher's
is computed from the test labels saved with the runs, the labels the students were scored on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from kdcore.analysis.metrics import per_class_accuracy
from kdcore.errors import DataError
from kdcore.store.runs import Run, RunStore
from kdcore.store.selection import best_student
from kdcore.value.compare import BASELINE
from kdcore.value.predictions import load_test_predictions


def teacher_per_class(store: RunStore, runs: Sequence[Run]) -> dict[str, float | None]:
    """The teacher's per-class test accuracy, from the first of ``runs`` with saved predictions.

    Read from a run's artifacts rather than its dataset, so it works for bundles and tabular
    data alike, and stays correct if the dataset moves after training.
    """
    problem = "no runs given"
    for run in runs:
        try:
            preds = load_test_predictions(store, run)
        except DataError as exc:
            problem = str(exc)
            continue
        return per_class_accuracy(preds.teacher_logits.argmax(1), preds.labels, preds.class_names)
    raise DataError(f"cannot read the runs' saved test predictions ({problem})")


def shown_students(group: Sequence[Run]) -> list[str]:
    """The students a before/after shows by default: vanilla KD (when trained) and the best
    student (kdcore.store.selection.best_student)."""
    best = best_student(group)
    kd = [BASELINE] if any(r.strategy == BASELINE for r in group) and best != BASELINE else []
    return kd + ([best] if best else [])


def before_after(store: RunStore, group: Sequence[Run], strategies: Sequence[str]) -> pd.DataFrame:
    """Per-class test accuracy: column ``class``, ``teacher``, then one column per strategy of
    ``strategies`` (mean over its seeds in ``group``), values in [0, 1], NaN where no seed
    recorded the class."""
    teacher = teacher_per_class(store, group)
    frame = pd.DataFrame({"class": list(teacher),
                          "teacher": np.array(list(teacher.values()), dtype=float)})
    for name in strategies:
        seeds = pd.DataFrame([r.metrics.get("per_class_accuracy") or {}
                              for r in group if r.strategy == name], dtype=float)
        frame[name] = frame["class"].map(seeds.mean()).astype(float)
    return frame
