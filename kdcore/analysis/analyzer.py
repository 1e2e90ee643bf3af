"""Teacher-bias analysis of any source: a dataset bundle or a prediction table, split by split.

Both kinds of input become one ``PredictionTable`` (:mod:`kdcore.data.sources`) so the CLI,
the dashboard and the report analyse them the same way. The user's label overrides are passed
in (the CLI and the dashboard read them from the workspace); nothing here touches the store.
A large Parquet table is streamed instead (:func:`analyze_stream`): chunk by chunk into one
:class:`~kdcore.analysis.bias.BiasAccumulator` per split, so at most one chunk of outputs is in
memory, and the document is the same as :func:`analyze` gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from kdcore.analysis.bias import BiasAccumulator, BiasReport, decompose, predicted_distribution
from kdcore.analysis.label_quality import LabelQuality, assess, concat, sample_keys
from kdcore.data.bundles import is_bundle, load_bundle
from kdcore.data.sources import bundle_features, bundle_table, load_predictions
from kdcore.data.tables import (
    DEFAULT_MAX_BYTES,
    LOGIT_PREFIX,
    PROB_PREFIX,
    SPLITS,
    PredictionTable,
    iter_parquet_chunks,
)
from kdcore.errors import DataError

# Parquet tables with more rows than this (by the file's metadata) are streamed, and so are
# those whose outputs take more than DEFAULT_MAX_BYTES in memory (rows x classes x
# OUTPUT_BYTES, however well the file is compressed).
STREAM_ROWS = 2_000_000
OUTPUT_BYTES = 4  # one float32 output value
# Rows per streamed chunk: about this many output values (64 MB of float32), at most 1,000,000.
STREAM_CHUNK_VALUES = 1 << 24

SPLIT_MEANING = {
    "train": "distillation data (labelled): what the bias-aware loss acts on",
    "unlabelled": "transfer data (teacher outputs only): distilled with plain KD",
    "test": "held-out data: how the teacher does on new samples",
}


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
        raise DataError(f"{table.source}: no labelled rows to analyse; add labels or pick "
                        "another split")
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


def label_quality_by_split(table: PredictionTable, *, features: np.ndarray | None = None,
                           overrides: dict[str, str] | None = None,
                           ) -> dict[str | None, tuple[np.ndarray, LabelQuality]]:
    """Label errors vs teacher bias, assessed split by split (each split on its own).

    Returns ``{split: (labelled row indices in the table, assessment)}`` for every split with
    labelled rows (key None for a table without a split column). Out-of-sample probabilities:
    cross-validated from ``features`` (one row per table row) when given, else the teacher's
    outputs on ``test`` rows (held out); other rows are reported as not assessable.
    """
    n = table.n_samples
    groups = ([(s, table.split == s) for s in table.splits] if table.split is not None
              else [(None, np.ones(n, dtype=bool))])
    out = {}
    for name, mask in groups:
        positions = np.flatnonzero(mask)
        ids = None if table.sample_id is None else table.sample_id[positions]
        keys = sample_keys(len(positions), name, ids)
        keep = table.labels[positions] >= 0
        if not keep.any():
            continue
        rows = positions[keep]
        out[name] = (rows, assess(
            table.labels[rows], table.outputs[rows], probabilities=table.probabilities,
            class_names=table.class_names,
            features=None if features is None else features[rows],
            held_out=name == "test", keys=keys[keep], overrides=overrides))
    return out


def assess_table(table: PredictionTable, *, features: np.ndarray | None = None,
                 overrides: dict[str, str] | None = None) -> LabelQuality:
    """:func:`label_quality_by_split` as one assessment, rows in the order of ``report(table)``
    (the labelled rows in table order)."""
    parts = label_quality_by_split(table, features=features, overrides=overrides)
    return _joined(parts, table)


def _joined(parts: dict, table: PredictionTable) -> LabelQuality:
    if not parts:
        return concat([], table.class_names)
    rows = np.concatenate([r for r, _ in parts.values()])
    whole = concat([lq for _, lq in parts.values()], table.class_names)
    return whole.take(np.argsort(rows, kind="stable"))


NO_LABELS = {"available": False, "reason": "no labelled rows: label errors need labels"}


def _with_label_quality(entry: dict, lq: LabelQuality) -> dict:
    """Add ``likely_label_errors`` and the per-class split of the bias rate to a report dict."""
    entry["likely_label_errors"] = lq.to_dict()
    counts = lq.per_class_counts() if lq.available else None
    for i, record in enumerate(entry.get("per_class", [])):
        support, bias = record.get("support") or 0, record.get("bias_rate")
        if counts is None or not support or bias is None:
            record["label_error_rate"] = record["teacher_bias_rate"] = None
        else:
            record["label_error_rate"] = float(counts[i] / support)
            record["teacher_bias_rate"] = float(bias - counts[i] / support)
    return entry


def analyze(table: PredictionTable, *, split: str | None = None, top: int = 10,
            label_quality: bool = False, features: np.ndarray | None = None,
            overrides: dict[str, str] | None = None) -> dict:
    """The ``kdcore analyze --json`` document: the (selected) labelled rows, then per split.

    With ``label_quality`` every labelled part also gets ``likely_label_errors`` and its
    per-class records ``label_error_rate`` + ``teacher_bias_rate`` (= ``bias_rate``); see
    :mod:`kdcore.analysis.label_quality`. ``features`` (one row per table row) allow cross-validated
    out-of-sample probabilities; ``overrides`` are the user's verdicts by sample key.
    """
    chosen = select(table, split)
    doc = {"source": table.source, "split": split}
    parts = {}
    if label_quality:
        chosen_features = (features if features is None or split is None
                           else features[table.split == split])
        parts = label_quality_by_split(chosen, features=chosen_features, overrides=overrides)
    if (chosen.labels >= 0).any():
        doc.update(report(chosen).to_dict(top=top))
        if label_quality:
            _with_label_quality(doc, _joined(parts, chosen))
    else:
        doc.update(split_summary(chosen), n_classes=table.n_classes, class_names=table.class_names)
        if label_quality:
            doc["likely_label_errors"] = dict(NO_LABELS)
    if split is None and len(table.splits) > 1:
        doc["splits"] = {}
        for name in table.splits:
            part = table.subset(name)
            if (part.labels >= 0).any():
                entry = report(part).to_dict(top=top)
                if label_quality:
                    rows, lq = parts[name]
                    _with_label_quality(entry, lq)
            else:
                entry = split_summary(part)
            entry["meaning"] = SPLIT_MEANING[name]
            doc["splits"][name] = entry
    return doc


# ----------------------------------------------------------------------------- large files


def should_stream(path: str | Path | None, stream: bool | None = None) -> bool:
    """Whether ``analyze_path`` streams ``path``: a Parquet file with more than STREAM_ROWS
    rows, or whose outputs decompressed (rows x output columns x OUTPUT_BYTES, by its metadata)
    or whose size on disk exceed the in-memory limit, or any Parquet file when ``stream`` is
    True. ``stream=False`` never streams. Raises DataError if streaming is asked of a file that
    is not Parquet."""
    if path is not None and not Path(path).exists():
        return False  # the in-memory reader says so
    if stream is False or path is None or is_bundle(path) or not Path(path).is_file():
        if stream:
            raise DataError(f"{Path(path).name if path else 'the sample'}: --stream reads "
                            "Parquet files only; leave it out for a bundle or a CSV file")
        return False
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            parquet = fh.read(4) == b"PAR1"
    except OSError:
        return False  # the in-memory reader explains
    if not parquet:
        if stream:
            raise DataError(f"{path.name}: --stream reads Parquet files only, and this is not "
                            "one; convert it to Parquet or leave --stream out")
        return False
    if stream:
        return True
    try:
        if path.stat().st_size > DEFAULT_MAX_BYTES:
            return True
        with pq.ParquetFile(str(path)) as pf:
            rows = pf.metadata.num_rows
            values = rows * _output_columns(pf.schema_arrow.names)
        return rows > STREAM_ROWS or values * OUTPUT_BYTES > DEFAULT_MAX_BYTES
    except Exception:
        return False  # the in-memory reader explains what is wrong with the file


def analyze_path(path: str | Path | None = None, *, split: str | None = None, top: int = 10,
                 stream: bool | None = None, overrides: dict[str, str] | None = None) -> dict:
    """``kdcore analyze``: a bundle or table in memory, or a large Parquet table streamed.

    In memory, the document has ``likely_label_errors`` (label errors vs teacher bias, with the
    user's ``overrides`` of the source, by sample key: the CLI loads them from the workspace);
    a streamed table does not (it needs a split's rows at once).
    """
    if should_stream(path, stream):
        return analyze_stream(path, split=split, top=top)
    features = None
    if path is None or is_bundle(path):
        bundle = load_bundle(path)
        table, features = bundle_table(bundle), bundle_features(bundle)
    else:
        table = load_predictions(path)
    return analyze(table, split=split, top=top, label_quality=True, features=features,
                   overrides=overrides)


STREAMED_LABEL_QUALITY = {
    "available": False,
    "reason": "the table was streamed chunk by chunk; label checks need a split's rows in "
              "memory (analyse one split, or a smaller table)",
}


class _Part:
    """What one split (or the whole file) needs for its entry: counts only."""

    def __init__(self, n_classes: int, class_names: list[str], probabilities: bool) -> None:
        self.accumulator = BiasAccumulator(n_classes, class_names=class_names,
                                           probabilities=probabilities)
        self.n_rows = 0
        self.n_labelled = 0
        # predicted classes of the unlabelled rows; a part without labelled rows reports these
        self.predicted = np.zeros(n_classes, dtype=np.int64)
        self.class_names = class_names
        self.probabilities = probabilities

    def add(self, labels: np.ndarray, outputs: np.ndarray) -> None:
        self.n_rows += len(labels)
        labelled = labels >= 0
        n_labelled = int(labelled.sum())
        if n_labelled:
            every = n_labelled == len(labels)
            self.accumulator.update(labels if every else labels[labelled],
                                    outputs if every else outputs[labelled])
            self.n_labelled += n_labelled
        if n_labelled < len(labels):
            rest = outputs if not n_labelled else outputs[~labelled]
            dist = predicted_distribution(rest, class_names=self.class_names,
                                          probabilities=self.probabilities)
            self.predicted += dist["count"].to_numpy(dtype=np.int64)

    def merge(self, other: _Part) -> None:
        """Add another part's counts (BiasAccumulator keeps only counts and sums)."""
        self.n_rows += other.n_rows
        self.n_labelled += other.n_labelled
        self.predicted += other.predicted
        self.accumulator.merge(other.accumulator)

    def entry(self, top: int) -> dict:
        """The same keys as ``report(...).to_dict()``, or ``split_summary(...)`` if unlabelled."""
        if self.n_labelled:
            return self.accumulator.report().to_dict(top=top)
        n = self.n_rows
        dist = pd.DataFrame({"class": self.class_names, "count": self.predicted,
                             "share": self.predicted / n})
        return {"n_samples": n, "labelled": False,
                "predicted_distribution": dist.to_dict(orient="records")}


def analyze_stream(path: str | Path, *, split: str | None = None, top: int = 10,
                   batch_rows: int | None = None) -> dict:
    """:func:`analyze` of a Parquet prediction table, read chunk by chunk.

    Memory holds one chunk of rows (``batch_rows``; by default about STREAM_CHUNK_VALUES
    output values) plus the confusion counts per split (K x K, or their nonzero cells above
    SPARSE_CONFUSION_CLASSES classes). Every chunk is validated like the in-memory
    reader does, with row numbers counted from the start of the file. The result equals
    ``analyze(read_prediction_table(path), split=split, top=top)`` (up to float rounding in
    the mean confidences, which are summed in a different order).
    """
    chunks = iter_parquet_chunks(path, batch_rows=batch_rows or _batch_rows(path))
    parts: dict[str, _Part] = {}
    unsplit: _Part | None = None
    source, names, kind = None, None, None
    for chunk in chunks:
        if names is None:
            source, names = chunk.source, list(chunk.class_names)
            kind = chunk.probabilities
        if chunk.split is None:
            if unsplit is None:
                unsplit = _Part(len(names), names, kind)
            unsplit.add(chunk.labels, chunk.outputs)
            continue
        values = chunk.split
        for name in SPLITS:
            mask = values == name
            if not mask.any():
                continue
            part = parts.get(name)
            if part is None:
                part = parts[name] = _Part(len(names), names, kind)
            if mask.all():
                part.add(chunk.labels, chunk.outputs)
            else:
                part.add(chunk.labels[mask], chunk.outputs[mask])
    present = [s for s in SPLITS if s in parts]
    if split is not None and split not in present:
        have = ", ".join(present) or "none (no split column)"
        raise DataError(f"{source}: no rows in split {split!r}; splits present: {have}")
    if split is not None:
        chosen = parts[split]
    elif unsplit is not None:
        chosen = unsplit
    else:
        chosen = _Part(len(names), names, kind)
        for name in present:
            chosen.merge(parts[name])

    doc = {"source": source, "split": split}
    entry = chosen.entry(top)
    if chosen.n_labelled:
        doc.update(entry)
    else:
        doc.update(entry, n_classes=len(names), class_names=names)
    if split is None and len(present) > 1:
        doc["splits"] = {}
        for name in present:
            item = parts[name].entry(top)
            item["meaning"] = SPLIT_MEANING[name]
            doc["splits"][name] = item
    return doc


def _batch_rows(path: str | Path) -> int:
    """Rows per chunk for about STREAM_CHUNK_VALUES outputs (the file's class count)."""
    try:
        with pq.ParquetFile(str(path)) as pf:
            names = pf.schema_arrow.names
    except Exception:
        return 1_000_000  # iter_parquet_chunks reports the problem
    k = _output_columns(names)
    return int(min(1_000_000, max(1_000, STREAM_CHUNK_VALUES // max(k, 1))))


def _output_columns(names: list[str]) -> int:
    """How many of a file's columns are the teacher's outputs (logit_/prob_ columns)."""
    return sum(1 for c in names if c.startswith((LOGIT_PREFIX, PROB_PREFIX)))
