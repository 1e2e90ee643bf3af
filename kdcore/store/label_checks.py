"""Label errors vs teacher bias, computed once per data source in a task process.

The label check (cleanlab on cross-validated or held-out probabilities,
:mod:`kdcore.analysis.label_quality`) takes seconds to tens of seconds on a large table; the
dashboard must draw its charts first and must not do that work in the server. So the check
runs as ``kdcore label-check SOURCE --out FILE`` in a background task
(:mod:`kdcore.store.tasks`) and keeps its per-row verdicts, *before* the user's overrides, in
``<workspace>/label_checks/<source key>.npz`` (aligned with the table's rows). The page reads
them when they are there and applies the overrides (stored apart, by sample key) on top.

Source key: :func:`kdcore.data.sources.source_key`, the table's content hash, so one table
is checked once whatever its name. A bundle (or a table file) is given to the task by its
path (a bundle's inputs allow cross-validation); an upload, which lives only in the server's
memory, is first written next to the verdicts as a Parquet prediction table. Both the key and
that file are made in a thread of the server, so the page's first render does not wait.

No streamlit, no torch: pages may import this module.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kdcore.analysis.label_quality import LabelQuality, unavailable
from kdcore.data.sources import source_key
from kdcore.data.tables import LOGIT_PREFIX, PROB_PREFIX, PredictionTable
from kdcore.store.tasks import Task, TaskStatus, start_task, task_status
from kdcore.workspace import resolve_workspace

LABEL_CHECKS_DIR = "label_checks"
NO_SPLIT = ""  # the meta key of a table without a split column


def check_path(workspace: str | Path | None, key: str) -> Path:
    """Where the verdicts of the source with ``key`` (``sha256:<hex>``) are kept."""
    return (resolve_workspace(workspace) / LABEL_CHECKS_DIR
            / f"{key.removeprefix('sha256:')[:32]}.npz")


# ---------------------------------------------------------------------- the task's side


def write_label_check(table: PredictionTable, out: str | Path, *,
                      features: np.ndarray | None = None) -> dict:
    """Assess every labelled split of ``table`` (each on its own, no overrides) and write the
    per-row verdicts to ``out`` (whole or not at all). Returns the per-split summary."""
    from kdcore.analysis.analyzer import label_quality_by_split

    n = table.n_samples
    score = np.full(n, np.nan, dtype=np.float32)
    model_pred = np.full(n, -1, dtype=np.int32)
    flagged = np.zeros(n, dtype=bool)
    likely = np.zeros(n, dtype=bool)
    meta: dict = {"n_rows": n, "splits": {}}
    for split, (rows, lq) in label_quality_by_split(table, features=features).items():
        meta["splits"][split or NO_SPLIT] = {
            "available": bool(lq.available), "reason": lq.reason, "method": lq.method,
            "note": lq.note, "n_teacher_wrong": int(lq.teacher_wrong.sum()),
            "n_label_errors": int(lq.likely_label_error.sum())}
        if lq.available:
            score[rows] = lq.label_quality
            model_pred[rows] = lq.model_pred
            flagged[rows] = lq.flagged
            likely[rows] = lq.likely_label_error
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as fh:
        np.savez(fh, label_quality=score, model_pred=model_pred, flagged=flagged,
                 likely_label_error=likely, meta=np.array(json.dumps(meta)))
    os.replace(tmp, out)
    return meta


def write_table(table: PredictionTable, out: str | Path) -> Path:
    """``table`` as a Parquet prediction table ``kdcore`` reads back row for row (whole or not
    at all): the task's input for an upload, which is only in the server's memory."""
    prefix = PROB_PREFIX if table.probabilities else LOGIT_PREFIX
    names = np.asarray(table.class_names, dtype=object)
    columns: dict = {}
    if table.sample_id is not None:
        columns["sample_id"] = pa.array(np.asarray(table.sample_id).astype(str))
    labels = np.asarray(table.labels)
    columns["label"] = pa.DictionaryArray.from_arrays(
        pa.array(labels, mask=labels < 0).cast(pa.int32()),
        pa.array(list(names))).dictionary_decode()
    if table.split is not None:
        columns["split"] = pa.array(table.split.astype(str))
    for i, name in enumerate(table.class_names):
        columns[f"{prefix}{name}"] = pa.array(table.outputs[:, i])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(pa.table(columns), tmp, compression="none")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------- the page's side


@dataclass(frozen=True)
class Verdicts:
    """A finished check as read back: per-row arrays aligned with the table, per-split meta."""

    label_quality: np.ndarray
    model_pred: np.ndarray
    flagged: np.ndarray
    likely_label_error: np.ndarray
    meta: dict

    @property
    def n_rows(self) -> int:
        return int(self.meta["n_rows"])


def read_verdicts(path: str | Path) -> Verdicts:
    """The verdicts a check wrote (no pickles: plain arrays and a JSON string)."""
    with np.load(path, allow_pickle=False) as data:
        return Verdicts(data["label_quality"], data["model_pred"], data["flagged"],
                        data["likely_label_error"], json.loads(str(data["meta"])))


def split_rows(table: PredictionTable, split: str | None) -> np.ndarray:
    """The table rows of ``select(table, split)``, in order."""
    if split is None or table.split is None:
        return np.arange(table.n_samples)
    return np.flatnonzero(table.split == split)


def assessment(verdicts: Verdicts, table: PredictionTable, split: str | None,
               rows: np.ndarray) -> LabelQuality:
    """The check of the labelled rows ``rows`` of ``select(table, split)`` (the rows of its
    bias report, in order) as one :class:`LabelQuality`, before overrides and without keys
    (:func:`override_positions` maps the overrides). Several splits join as
    :func:`kdcore.analysis.label_quality.concat` joins them."""
    if verdicts.n_rows != table.n_samples:
        raise ValueError(f"the stored label check has {verdicts.n_rows:,} rows, the table "
                         f"{table.n_samples:,}; it is checked again")
    index = split_rows(table, split)[rows]
    labels = np.asarray(table.labels)[index]
    teacher_pred = np.asarray(table.outputs)[index].argmax(1)
    names = list(table.class_names)
    if split is not None or table.split is None:
        parts = [verdicts.meta["splits"].get(split or NO_SPLIT)]
    else:
        parts = [verdicts.meta["splits"].get(s) for s in table.splits]
    parts = [p for p in parts if p]
    live = [p for p in parts if p["available"]]
    if not live:
        reason = parts[0]["reason"] if parts else "no labelled rows were checked"
        return unavailable(labels, teacher_pred, reason, class_names=names)
    if len(parts) == 1:
        method, note = live[0]["method"], live[0]["note"]
    else:
        method = "; ".join(sorted({p["method"] for p in live}))
        note = " ".join(sorted({p["note"] for p in live})) + "".join(
            f" Not assessed: {p['reason']}." for p in parts if not p["available"])
    return LabelQuality(
        True, len(names), names, labels, teacher_pred, method=method, note=note,
        label_quality=verdicts.label_quality[index].astype(float),
        model_pred=verdicts.model_pred[index].astype(np.int64),
        flagged=verdicts.flagged[index].copy(),
        likely_label_error=verdicts.likely_label_error[index].copy())


def sample_key(table: PredictionTable, row: int) -> str:
    """The override key of table row ``row``, as :func:`kdcore.analysis.analyzer.
    label_quality_by_split` names it: its sample id, else ``<split>:<row within the split>``
    (``row:<i>`` without a split column)."""
    if table.sample_id is not None:
        return str(table.sample_id[row])
    if table.split is None:
        return f"row:{row}"
    name = table.split[row]
    return f"{name}:{int(np.count_nonzero(table.split[:row] == name))}"


def override_positions(table: PredictionTable, split: str | None, rows: np.ndarray,
                       overrides: dict[str, str]) -> tuple[np.ndarray, list[str]]:
    """Positions in the report of ``select(table, split)`` (labelled ``rows``) of the samples
    that have an override, and their verdicts; keys of other rows are left out."""
    if not overrides:
        return np.zeros(0, dtype=np.int64), []
    keys = list(overrides)
    found = np.full(len(keys), -1, dtype=np.int64)
    if table.sample_id is not None:
        found = pd.Index(np.asarray(table.sample_id).astype(str)).get_indexer(keys)
    else:
        for j, key in enumerate(keys):
            name, _, pos = key.rpartition(":")
            if not pos.isdigit():
                continue
            within = (np.arange(table.n_samples) if name == "row" and table.split is None
                      else split_rows(table, name) if table.split is not None
                      and name in table.splits else np.zeros(0, dtype=np.int64))
            if int(pos) < len(within):
                found[j] = within[int(pos)]
    index = split_rows(table, split)[rows]  # ascending table rows of the report
    at = np.clip(np.searchsorted(index, found), 0, max(len(index) - 1, 0))
    hit = (found >= 0) & (len(index) > 0) & (index[at] == found)
    return at[hit], [overrides[k] for k, h in zip(keys, hit, strict=True) if h]


# ---------------------------------------------------------------------- starting a check


class LabelCheck:
    """One source's check, begun by :meth:`start` and followed by :meth:`status`: the source
    key and the upload's file are made in a thread (seconds on a large table), then the task
    runs (or its finished verdicts are reused). Held by the app per source, not pickled."""

    def __init__(self, table: PredictionTable, *, path: str | Path | None = None,
                 workspace: str | Path | None = None) -> None:
        self.workspace = resolve_workspace(workspace)
        self.key: str | None = None
        self.output: Path | None = None
        self.task: Task | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._prepare, args=(table, path),
                                        name="kdcore-label-check", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> LabelCheck:
        """Begin (once): a page calls this after drawing its charts, so that hashing and
        writing a large table do not slow them down; :meth:`status` calls it too."""
        with self._lock:
            if self._thread.ident is None:
                self._thread.start()
        return self

    def _prepare(self, table: PredictionTable, path: str | Path | None) -> None:
        try:
            key = source_key(table)
            output = check_path(self.workspace, key)
            self.key, self.output = key, output
            if output.is_file():
                return
            if path is None:
                path = write_table(table, output.with_suffix(".input.parquet"))
            self.task = start_task(["label-check", str(path), "--out", str(output)],
                                   output=output, workspace=self.workspace)
        except Exception as exc:  # shown on the page as one line; the charts still stand
            self.error = f"{type(exc).__name__}: {exc}"

    def wait_prepared(self, timeout: float | None = None) -> None:
        self.start()._thread.join(timeout)

    def status(self, *, start: bool = True) -> TaskStatus:
        """running (preparing, or the task runs), done (the verdicts are there) or failed.
        ``start=False`` only looks: a check not begun yet is running ("preparing")."""
        if start:
            self.start()
        if self._thread.ident is None or self._thread.is_alive():
            return TaskStatus("running", "preparing", 0.0)
        if self.error:
            return TaskStatus("failed", self.error, 0.0)
        if self.task is None:
            return TaskStatus("done" if self.output and self.output.is_file() else "failed",
                              "", 0.0)
        return task_status(self.task)
