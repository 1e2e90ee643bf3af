"""Teacher-bias analysis of any source: a dataset bundle or a prediction table, split by split.

Both kinds of input become one ``PredictionTable`` so the CLI, the dashboard and the report
analyse them the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdcore.bias import BiasReport, decompose, predicted_distribution
from kdcore.bundles import Bundle, is_bundle, load_bundle
from kdcore.errors import DataError
from kdcore.tables import PredictionTable, read_prediction_table

SPLIT_MEANING = {
    "train": "distillation data (labelled): what the bias-aware loss acts on",
    "unlabelled": "transfer data (teacher outputs only): distilled with plain KD",
    "test": "held-out data: how the teacher does on new samples",
}


def bundle_table(bundle: Bundle) -> PredictionTable:
    """All splits of a bundle as one prediction table (unlabelled rows have label -1)."""
    splits = bundle.splits
    labels = [bundle.y(s) if bundle.y(s) is not None else np.full(len(bundle.x(s)), -1)
              for s in splits]
    return PredictionTable(
        source=bundle.name,
        class_names=bundle.class_names,
        outputs=np.concatenate([bundle.teacher_logits(s) for s in splits]).astype(np.float32),
        kind="logits",
        labels=np.concatenate(labels).astype(np.int64),
        split=np.concatenate([np.full(len(bundle.x(s)), s, dtype=object) for s in splits]),
        sample_id=None,
        extra=None,
    )


def load_predictions(path: str | Path | None = None) -> PredictionTable:
    """A bundle folder (default: the bundled sample) or a CSV/Parquet prediction table."""
    if path is None or is_bundle(path):
        return bundle_table(load_bundle(path))
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; pass a bundle folder or a CSV/Parquet table")
    if path.is_dir():
        raise DataError(f"{path}: a folder without manifest.json; pass a bundle folder or a CSV/Parquet table")
    return read_prediction_table(path)


def select(table: PredictionTable, split: str | None) -> PredictionTable:
    """One split's rows, or the whole table for None."""
    if split is None:
        return table
    if split not in table.splits:
        have = ", ".join(table.splits) or "none (no split column)"
        raise DataError(f"{table.source}: no rows in split {split!r}; splits present: {have}")
    return table.subset(split)


def report(table: PredictionTable) -> BiasReport:
    """Decompose the labelled rows of a table."""
    labelled = table.labels >= 0
    if not labelled.any():
        raise DataError(f"{table.source}: no labelled rows to analyse; add labels or pick another split")
    outputs = table.outputs if labelled.all() else table.outputs[labelled]
    labels = table.labels if labelled.all() else table.labels[labelled]
    return decompose(labels, outputs, class_names=table.class_names,
                     probabilities=table.probabilities)


def split_summary(table: PredictionTable) -> dict:
    """What an unlabelled split can tell: its size and the teacher's predicted classes."""
    dist = predicted_distribution(table.outputs, class_names=table.class_names,
                                  probabilities=table.probabilities)
    return {
        "n_samples": table.n_samples,
        "labelled": False,
        "predicted_distribution": dist.to_dict(orient="records"),
    }


def analyze(table: PredictionTable, *, split: str | None = None, top: int = 10) -> dict:
    """The ``kdcore analyze --json`` document: the (selected) labelled rows, then per split."""
    chosen = select(table, split)
    doc = {"source": table.source, "split": split}
    if (chosen.labels >= 0).any():
        doc.update(report(chosen).to_dict(top=top))
    else:
        doc.update(split_summary(chosen), n_classes=table.n_classes, class_names=table.class_names)
    if split is None and len(table.splits) > 1:
        doc["splits"] = {}
        for name in table.splits:
            part = table.subset(name)
            entry = (report(part).to_dict(top=top) if (part.labels >= 0).any()
                     else split_summary(part))
            entry["meaning"] = SPLIT_MEANING[name]
            doc["splits"][name] = entry
    return doc
