"""A user's verdicts on teacher-wrong samples ("label error" or "teacher bias"), per workspace.

Stored in ``<workspace>/label_overrides.sqlite`` (its own small file, so the run store's schema
is untouched): one row per (source, sample_key). ``source`` is the data source's name (a
bundle's name, a table's file name); ``sample_key`` is the row's ``sample_id`` when the data has
one, else ``<split>:<row within the split>`` (``row:<i>`` without a split column; see
:func:`kdcore.analysis.label_quality.sample_keys`). Overrides win over the detection in
:mod:`kdcore.analysis.label_quality`, in the analysis and in training with ``+lq`` (a run
records the overrides it used in its config).

Reading never creates the file; an absent file means no overrides.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from kdcore.analysis.label_quality import VERDICTS
from kdcore.errors import DataError
from kdcore.workspace import resolve_workspace

FILE_NAME = "label_overrides.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS label_overrides (
    source      TEXT NOT NULL,
    sample_key  TEXT NOT NULL,
    verdict     TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (source, sample_key)
)
"""


def _path(workspace: str | Path | None) -> Path:
    """The file's path, without creating the workspace (reading must leave no folder behind)."""
    return resolve_workspace(workspace, create=False) / FILE_NAME


def _connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, timeout=10)
    con.execute(SCHEMA)
    return con


def load_overrides(workspace: str | Path | None, source: str) -> dict[str, str]:
    """``{sample_key: verdict}`` for one source ({} when there are none)."""
    path = _path(workspace)
    if not path.is_file():
        return {}
    with closing(_connect(path)) as con:
        rows = con.execute("SELECT sample_key, verdict FROM label_overrides WHERE source = ?",
                           (source,)).fetchall()
    return {key: verdict for key, verdict in rows}


def set_override(workspace: str | Path | None, source: str, sample_key: str,
                 verdict: str | None) -> None:
    """Store a verdict for a sample (``None`` removes the override, back to the detection)."""
    if verdict is not None and verdict not in VERDICTS:
        raise DataError(f"verdict {verdict!r}: use {' or '.join(VERDICTS)} (or none to clear)")
    path = _path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(_connect(path)) as con, con:
        if verdict is None:
            con.execute("DELETE FROM label_overrides WHERE source = ? AND sample_key = ?",
                        (source, str(sample_key)))
        else:
            con.execute(
                "INSERT INTO label_overrides (source, sample_key, verdict, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (source, sample_key) DO UPDATE SET "
                "verdict = excluded.verdict, updated_at = excluded.updated_at",
                (source, str(sample_key), verdict,
                 datetime.now(timezone.utc).isoformat(timespec="seconds")))


def attach(config, workspace: str | Path | None):
    """The config with the source's current overrides recorded, when its strategy uses ``+lq``.

    Recording them makes a run reproducible and keeps identical-run reuse honest: a changed
    override is a changed config.
    """
    try:
        uses_lq = config.parsed().lq
    except Exception:
        return config
    if not uses_lq:
        return config
    config.label_overrides = dict(sorted(load_overrides(workspace, source_name(config)).items()))
    return config


def source_name(config) -> str:
    """The override source of a training config's data: the bundle's name or the file name."""
    from kdcore.data.bundles import is_bundle, load_bundle

    path = config.bundle or None
    if path is None or is_bundle(path) or Path(path).is_dir():
        return load_bundle(path).name
    return Path(path).resolve().name
