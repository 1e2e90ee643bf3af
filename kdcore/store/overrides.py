"""A user's verdicts on teacher-wrong samples ("label error" or "teacher bias"), per workspace.

Stored in ``<workspace>/label_overrides.sqlite`` (its own small file, so the run store's schema
is untouched): one row per (source, sample_key). ``source`` is the content hash of the data
source's table (:func:`kdcore.data.sources.source_key`), so verdicts on one file never leak
onto another file of the same name; ``sample_key`` is the row's ``sample_id`` when the data has
one, else ``<split>:<row within the split>`` (``row:<i>`` without a split column; see
:func:`kdcore.analysis.label_quality.sample_keys`). Overrides win over the detection in
:mod:`kdcore.analysis.label_quality`, in the analysis and in training with ``+lq`` (a run
records the overrides it used in its config).

Rows of earlier versions, keyed by the source's name, are kept but never applied: a name does
not say which content it meant. Reading never creates the file; an absent file means no
overrides. A damaged file is a DataError naming the file and the fix, raised only where
overrides are used (``analyze``, the Teacher bias page, ``+lq`` training).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path

from kdcore.analysis.label_quality import VERDICTS
from kdcore.data.bundles import is_bundle
from kdcore.data.sources import load_predictions, source_key
from kdcore.errors import DataError, KDCoreError
from kdcore.workspace import resolve_workspace

FILE_NAME = "label_overrides.sqlite"
KEY_PREFIX = "sha256:"  # of every source key; earlier versions keyed rows by name
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


@contextmanager
def _database(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to the overrides file; any SQLite failure becomes one line with the fix."""
    try:
        with closing(sqlite3.connect(path, timeout=10)) as con:
            con.execute(SCHEMA)
            yield con
    except sqlite3.DatabaseError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise KDCoreError(f"{path} is busy ({exc}); try again") from None
        raise DataError(f"{path}: cannot read the label overrides ({exc}); move the file away "
                        f"(e.g. to {path.name}.bad) to start again without overrides") from None


def load_overrides(workspace: str | Path | None, source: str) -> dict[str, str]:
    """``{sample_key: verdict}`` for one source key ({} when there are none)."""
    path = _path(workspace)
    if not path.is_file():
        return {}
    with _database(path) as con:
        rows = con.execute("SELECT sample_key, verdict FROM label_overrides WHERE source = ?",
                           (source,)).fetchall()
    return {key: verdict for key, verdict in rows}


def set_override(workspace: str | Path | None, source: str, sample_key: str,
                 verdict: str | None) -> None:
    """Store a verdict for a sample of the source with key ``source`` (``None`` removes the
    override, back to the detection)."""
    if verdict is not None and verdict not in VERDICTS:
        raise DataError(f"verdict {verdict!r}: use {' or '.join(VERDICTS)} (or none to clear)")
    if not source.startswith(KEY_PREFIX):
        raise DataError(f"{source!r} is not a source key; use kdcore.data.sources.source_key")
    path = _path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _database(path) as con, con:
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


def overrides_for(workspace: str | Path | None, path: str | Path | None) -> dict[str, str]:
    """The overrides of the source at ``path`` (a bundle folder or a prediction table; None:
    the bundled sample). The data is read, to hash it, only when the workspace has any."""
    if not _any(workspace):
        return {}
    return load_overrides(workspace, _source_key(*_stamp(path)))


def _any(workspace: str | Path | None) -> bool:
    """Whether the workspace holds any override (of this version's keys)."""
    path = _path(workspace)
    if not path.is_file():
        return False
    with _database(path) as con:
        return con.execute("SELECT 1 FROM label_overrides WHERE substr(source, 1, ?) = ? LIMIT 1",
                           (len(KEY_PREFIX), KEY_PREFIX)).fetchone() is not None


def _stamp(path: str | Path | None) -> tuple[str | None, tuple]:
    """``path`` resolved, with the size and time of its files (of a bundle: its folder's)."""
    if path is None:
        return None, ()
    path = Path(path).resolve()
    if path.name == "manifest.json":
        path = path.parent
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    try:
        return str(path), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    except OSError:
        return str(path), ()  # the reader says what is wrong


@functools.lru_cache(maxsize=16)
def _source_key(path: str | None, stamp: tuple) -> str:
    """The source key of the data at ``path``, once per version of its files (a comparison
    attaches the overrides of the same data to every one of its configs)."""
    return source_key(load_predictions(path))


def attach(config, workspace: str | Path | None):
    """The config with the source's current overrides recorded, when its strategy uses ``+lq``.

    Recording them makes a run reproducible and keeps identical-run reuse honest: a changed
    override is a changed config. Training data that is no prediction table (a tabular file
    whose teacher outputs are elsewhere) has none: no page could have set them.
    """
    try:
        uses_lq = config.parsed().lq
    except Exception:
        return config
    if not uses_lq:
        return config
    path = config.bundle or None
    overrides: dict[str, str] = {}
    if _any(workspace):
        try:
            key = _source_key(*_stamp(path))
        except DataError:
            if path is None or is_bundle(path) or Path(path).is_dir():
                raise
            key = None  # a tabular file that is no prediction table
        overrides = load_overrides(workspace, key) if key else {}
    config.label_overrides = dict(sorted(overrides.items()))
    return config
