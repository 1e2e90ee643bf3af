"""What the analysis reads: any source (a bundle folder or a prediction table) as one table.

A bundle's splits become one :class:`~kdcore.data.tables.PredictionTable` (rows split by split,
in the order train, unlabelled, test), so the CLI, the dashboard and the report analyse both
kinds of input the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from kdcore.data.bundles import Bundle, is_bundle, load_bundle
from kdcore.data.tables import PredictionTable, read_prediction_table
from kdcore.errors import DataError


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


def bundle_features(bundle: Bundle) -> np.ndarray:
    """The bundle's inputs, flattened, in the row order of :func:`bundle_table`."""
    return np.concatenate([bundle.x(s).reshape(len(bundle.x(s)), -1) for s in bundle.splits])


def load_predictions(path: str | Path | None = None) -> PredictionTable:
    """A bundle folder (default: the bundled sample) or a CSV/Parquet prediction table."""
    if path is None or is_bundle(path):
        return bundle_table(load_bundle(path))
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; pass a bundle folder or a "
                        "CSV/Parquet table")
    if path.is_dir():
        raise DataError(f"{path}: a folder without manifest.json; pass a bundle folder or a "
                        "CSV/Parquet table")
    return read_prediction_table(path)


def source_key(table: PredictionTable) -> str:
    """The content hash of a source's table, ``sha256:<hex>``: the key of its label overrides.

    By content, not by name: two files of one name in different folders never share verdicts,
    and a file moved or renamed keeps its own. Hashed: the class names, the outputs, the
    labels, the splits and the sample ids (not the name, nor extra columns).
    """
    digest = hashlib.sha256(json.dumps([table.class_names, table.kind]).encode("utf-8"))
    for values in (table.outputs, table.labels):
        values = np.ascontiguousarray(values)
        digest.update(f"{values.dtype.str}{values.shape}".encode("ascii"))
        digest.update(values.reshape(-1).view(np.uint8))  # the bytes, without a copy
    for values in (table.split, table.sample_id):
        text = "-" if values is None else "+" + "\x00".join(map(str, values))
        digest.update(text.encode("utf-8", "surrogatepass"))
    return "sha256:" + digest.hexdigest()
