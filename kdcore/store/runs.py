"""The run store: one SQLite database (WAL mode) plus an artifacts folder per run.

Layout of a workspace (folder chosen by :func:`kdcore.workspace.resolve_workspace`)::

    <workspace>/runs.sqlite          runs + per-epoch metrics (plus -wal / -shm while in use)
    <workspace>/runs/<run_id>/       artifacts of one run (test predictions, weights, CANCEL, ...)

Concurrency: each thread of each process uses its own connection (``timeout=30``,
``busy_timeout=30000``, ``journal_mode=WAL``, ``synchronous=NORMAL``; reopened after a fork
or if the db file is replaced), reads run in autocommit snapshots and every write runs inside
one ``BEGIN IMMEDIATE`` transaction, so several processes (the app, a few ``kdcore train``
subprocesses, the CLI) can write at once without "database is locked", and a process killed
mid-write never leaves a half-written run. A :class:`RunStore` is safe to share between
threads (e.g. via ``st.cache_resource``). WAL needs a local filesystem (not NFS/SMB).

Cancelling: :meth:`RunStore.request_cancel` sets the ``cancel_requested`` column *and* writes
the sentinel file ``<artifacts>/CANCEL``. :meth:`RunStore.cancel_requested` - called by the
trainer every batch - only checks that file (one ``stat``), so the hot loop never touches
SQLite.

Stale runs: a run left ``running`` (or ``queued`` with a pid) by a process that is gone on
this host is marked ``failed`` with an "interrupted: ..." error by :meth:`RunStore.reap_stale`,
which :meth:`RunStore.get` and :meth:`RunStore.list` call first.

Identical runs: :meth:`RunStore.claim` finds or creates the run of a config in one transaction,
so two commands asking for the same config at once never train it twice.

A row whose stored JSON (config or metrics) does not parse reads as a ``failed`` run with an
"unreadable ..." error: one damaged row never breaks listing the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import secrets
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from kdcore.errors import DataError, KDCoreError
from kdcore.workspace import resolve_workspace

__all__ = [
    "CANCEL_FILE",
    "DB_NAME",
    "FRAME_COLUMNS",
    "JOB_LOG",
    "RUNS_DIR",
    "SCHEMA_VERSION",
    "STATUSES",
    "TERMINAL_STATUSES",
    "Run",
    "RunStore",
    "config_key",
    "resolve_workspace",
    "to_frame",
]

STATUSES: tuple[str, ...] = ("queued", "running", "done", "failed", "cancelled")
TERMINAL_STATUSES: frozenset[str] = frozenset({"done", "failed", "cancelled"})
SCHEMA_VERSION = 2  # 1: tables; 2: run configs with method_options
DB_NAME = "runs.sqlite"
RUNS_DIR = "runs"
CANCEL_FILE = "CANCEL"
JOB_LOG = "job.log"  # a background job's output (kdcore.store.jobs)

# Connections inherited through os.fork(): kept referenced so the child never closes them.
_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []

_ID_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_-]*$")
_MAX_ERROR_CHARS = 2000

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS runs (
    id               TEXT PRIMARY KEY,
    status           TEXT NOT NULL
                     CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    strategy         TEXT,
    seed             INTEGER,
    bundle           TEXT,
    config           TEXT NOT NULL,
    config_key       TEXT NOT NULL,
    metrics          TEXT,
    error            TEXT,
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT,
    updated_at       TEXT,
    pid              INTEGER,
    pid_started      INTEGER,
    host             TEXT,
    step             INTEGER NOT NULL DEFAULT 0,
    total_steps      INTEGER,
    message          TEXT NOT NULL DEFAULT '',
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created_at);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);
CREATE INDEX IF NOT EXISTS runs_by_config_key ON runs (config_key, status);
CREATE TABLE IF NOT EXISTS epochs (
    run_id    TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    epoch     INTEGER NOT NULL,
    metrics   TEXT NOT NULL,
    logged_at TEXT NOT NULL,
    PRIMARY KEY (run_id, epoch)
) WITHOUT ROWID;
"""


# --------------------------------------------------------------------------- helpers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _new_run_id() -> str:
    """``YYYYMMDD-HHMMSS-xxxxxx`` (UTC time + 24 random bits): short, sortable, unique."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _jsonable(obj: Any) -> Any:
    """``json.dumps`` default hook: NumPy scalars/arrays, paths, sets, torch scalars."""
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays/scalars, torch tensors
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, default=_jsonable)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} is not JSON-serialisable ({exc}); pass plain numbers, "
                        "strings, lists and dicts") from exc


def _canonical(config: Mapping[str, Any]) -> str:
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), default=_jsonable)
    except (TypeError, ValueError) as exc:
        raise DataError(f"run config is not JSON-serialisable ({exc}); pass plain numbers, "
                        "strings, lists and dicts") from exc


def config_key(config: Mapping[str, Any]) -> str:
    """Stable sha256 (hex) of the canonical JSON of ``config`` (sorted keys, no spaces)."""
    return hashlib.sha256(_canonical(config).encode("utf-8")).hexdigest()


# Schema 2: dkd's options moved from flat TrainConfig fields, stored with every run whatever its
# strategy, into ``method_options``, which TrainConfig.to_dict leaves out at the method's
# defaults. Frozen: a later change of those defaults needs a migration of its own.
_V1_DKD_FIELDS = {"dkd_alpha": ("alpha", 1.0), "dkd_beta": ("beta", 8.0),
                  "dkd_warmup": ("warmup", 20)}


def _config_v2(config: dict[str, Any]) -> dict[str, Any]:
    """A run config of schema 1 in the shape of schema 2 (the same dict where nothing moves)."""
    if not _V1_DKD_FIELDS.keys() & config.keys():
        return config
    new = {k: v for k, v in config.items() if k not in _V1_DKD_FIELDS}
    if str(config.get("strategy") or "").split("+")[0] == "dkd":  # the others ignored them
        options = {name: config.get(old, default)
                   for old, (name, default) in _V1_DKD_FIELDS.items()}
        if options != dict(_V1_DKD_FIELDS.values()):
            new["method_options"] = options
    return new


def _migrate_configs(conn: sqlite3.Connection,
                     upgrade: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Rewrite every run's config with ``upgrade(config) -> config`` and recompute its key, so
    that an equal config of the new shape finds the old run (inside the caller's transaction)."""
    for row in conn.execute("SELECT id, config FROM runs").fetchall():
        config = _loads(row["config"])
        if config is None:
            continue  # unreadable: left as it is, and read as such (see _row_to_run)
        new = upgrade(config)
        if new is not config:
            conn.execute("UPDATE runs SET config = ?, config_key = ? WHERE id = ?",
                         (_dumps(new, "run config"), config_key(new), row["id"]))


def _one_line(text: str, limit: int = _MAX_ERROR_CHARS) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    out = " | ".join(lines)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, starttime ticks) from /proc/<pid>/stat, or None where /proc is unavailable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) S ppid ..." - comm may contain spaces and parentheses.
    rest = raw[raw.rfind(")") + 2 :].split()
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def _pid_start(pid: int | None) -> int | None:
    if pid is None:
        return None
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _process_alive(pid: int, pid_started: int | None = None) -> bool:
    """True while ``pid`` runs on this host. Zombies and reused pids count as dead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    stat = _proc_stat(pid)
    if stat is not None:
        state, started = stat
        if state in ("Z", "X", "x"):
            return False
        if pid_started is not None and started != pid_started:
            return False  # the pid was reused by another process
    return True


# --------------------------------------------------------------------------- Run


@dataclasses.dataclass(frozen=True)
class Run:
    """One row of the store, as read by :meth:`RunStore.get` / :meth:`RunStore.list`."""

    id: str
    status: str
    strategy: str | None
    seed: int | None
    bundle: str | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    pid: int | None
    host: str | None
    step: int
    total_steps: int | None
    message: str
    config_key: str = ""
    cancel_requested: bool = False
    updated_at: str | None = None
    unreadable: bool = False  # its stored JSON is damaged: read as failed, ``error`` says so

    @property
    def fraction(self) -> float | None:
        """Progress in [0, 1] from the last :meth:`RunStore.progress` call (1.0 when done)."""
        if self.status == "done":
            return 1.0
        if not self.total_steps:
            return None
        return max(0.0, min(1.0, self.step / self.total_steps))

    @property
    def finished(self) -> bool:
        """True for ``done``, ``failed`` and ``cancelled``."""
        return self.status in TERMINAL_STATUSES

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to finish (or to now while running); None if never started."""
        if not self.started_at:
            return None
        start = datetime.fromisoformat(self.started_at)
        end = (datetime.fromisoformat(self.finished_at) if self.finished_at
               else datetime.now(timezone.utc))
        return max(0.0, (end - start).total_seconds())


_RUN_COLUMNS = (
    "id, status, strategy, seed, bundle, config, metrics, error, created_at, started_at, "
    "finished_at, pid, host, step, total_steps, message, config_key, cancel_requested, updated_at"
)


def _loads(text: str | None) -> dict[str, Any] | None:
    """A stored JSON object ({} for none), or None when the text is not one (a damaged row)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _row_to_run(row: sqlite3.Row) -> Run:
    """The run of a row; a row whose config or metrics do not parse reads as a failed run that
    says so, so that it is never reused or compared, and the rest of the store stays usable."""
    config, metrics = _loads(row["config"]), _loads(row["metrics"])
    status, error = row["status"], row["error"]
    damaged = [name for name, value in (("config", config), ("metrics", metrics))
               if value is None]
    if damaged:
        status = "failed"
        error = (f"unreadable run record: its stored {' and '.join(damaged)} "
                 f"{'is' if len(damaged) == 1 else 'are'} not valid JSON; remove it with "
                 f"`kdcore runs rm {row['id']}`")
    return Run(
        id=row["id"],
        status=status,
        strategy=row["strategy"],
        seed=row["seed"],
        bundle=row["bundle"],
        config=config or {},
        metrics=metrics or {},
        error=error,
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        pid=row["pid"],
        host=row["host"],
        step=int(row["step"] or 0),
        total_steps=row["total_steps"],
        message=row["message"] or "",
        config_key=row["config_key"],
        cancel_requested=bool(row["cancel_requested"]),
        updated_at=row["updated_at"],
        unreadable=bool(damaged),
    )


def _metric(metrics: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return math.nan


FRAME_COLUMNS = (
    "id", "created_at", "strategy", "seed", "bundle", "status", "test_accuracy",
    "best_test_accuracy", "bias_inheritance", "step", "total_steps", "fraction",
    "started_at", "finished_at", "duration_s", "error",
)


def to_frame(runs: Iterable[Run]) -> pd.DataFrame:
    """One row per run with the columns in ``FRAME_COLUMNS`` (metrics missing -> NaN)."""
    rows = [
        {
            "id": r.id,
            "created_at": r.created_at,
            "strategy": r.strategy,
            "seed": r.seed,
            "bundle": r.bundle,
            "status": r.status,
            "test_accuracy": _metric(r.metrics, "test_accuracy", "accuracy"),
            "best_test_accuracy": _metric(r.metrics, "best_test_accuracy"),
            "bias_inheritance": _metric(r.metrics, "bias_inheritance"),
            "step": r.step,
            "total_steps": r.total_steps,
            "fraction": r.fraction,
            "started_at": r.started_at,
            "finished_at": r.finished_at,
            "duration_s": r.duration_s,
            "error": r.error,
        }
        for r in runs
    ]
    return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))


# --------------------------------------------------------------------------- RunStore


class RunStore:
    """Runs and their artifacts in one workspace folder. Cheap to construct; thread-safe."""

    to_frame = staticmethod(to_frame)

    def __init__(self, workspace: str | Path | None = None) -> None:
        self.workspace: Path = resolve_workspace(workspace)
        self.db_path: Path = self.workspace / DB_NAME
        self.runs_dir: Path = self.workspace / RUNS_DIR
        self._host = socket.gethostname()
        self._local = threading.local()
        self._conn()  # creates or migrates the schema now, so errors surface early

    def __repr__(self) -> str:
        return f"RunStore({str(self.workspace)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # picklable (multiprocessing spawn, DDP): the copy opens its own connections
        return (type(self), (str(self.workspace),))

    # ------------------------------------------------------------------ connections

    def _open(self) -> sqlite3.Connection:
        """A configured connection with the current schema.

        Switching a fresh file to WAL can fail with "database is locked" without waiting
        for the busy handler (SQLite's deadlock avoidance) while other processes set up the
        same file, so opening is retried with a short backoff for up to 30 s.
        """
        deadline = time.monotonic() + 30
        delay = 0.005
        while True:
            conn = None
            try:
                conn = sqlite3.connect(str(self.db_path), timeout=30, isolation_level=None)
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA busy_timeout=30000")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
                self._ensure_schema(conn)
                return conn
            except sqlite3.OperationalError as exc:
                if conn is not None:
                    conn.close()
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy or time.monotonic() > deadline:
                    raise KDCoreError(
                        f"cannot open the run store {self.db_path}: {exc}"
                    ) from exc
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.1)
            except BaseException:
                if conn is not None:
                    conn.close()
                raise

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, reopened after a fork or if the db file was replaced.

        One connection per thread (not per operation): closing the last connection to a
        WAL database checkpoints and fsyncs, which made every write ~20x slower.
        """
        try:
            inode: int | None = os.stat(self.db_path).st_ino
        except FileNotFoundError:
            inode = None
        cached = getattr(self._local, "conn", None)
        if cached is not None:
            pid, cached_inode, conn = cached
            if pid == os.getpid() and inode is not None and inode == cached_inode:
                return conn
            self._local.conn = None
            if pid == os.getpid():
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            else:  # inherited across fork: never touch (or free) it in the child
                _INHERITED_CONNECTIONS.append(conn)
        if inode is None:
            self.workspace.mkdir(parents=True, exist_ok=True)
        conn = self._open()
        try:
            inode = os.stat(self.db_path).st_ino
        except BaseException:
            conn.close()
            raise
        self._local.conn = (os.getpid(), inode, conn)
        return conn

    def close(self) -> None:
        """Close this thread's connection (the store reopens one when used again)."""
        cached = getattr(self._local, "conn", None)
        self._local.conn = None
        if cached is not None and cached[0] == os.getpid():
            cached[2].close()

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads; each statement runs in its own (autocommit) snapshot."""
        yield self._conn()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: all or nothing."""
        conn = self._conn()
        self._begin(conn)
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # unusable: drop it, SQLite rolls back on close
                    self.close()
            raise

    @staticmethod
    def _begin(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:  # left open by an interrupted write: discard it
            conn.execute("ROLLBACK")
        conn.execute("BEGIN IMMEDIATE")

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        self._begin(conn)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise DataError(
                    f"the run store {self.db_path} has schema {version}, newer than this "
                    f"kdcore understands ({SCHEMA_VERSION}); upgrade kdcore or use another "
                    "--workspace"
                )
            if version < 1:
                for statement in _SCHEMA_V1.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            if version < 2:
                _migrate_configs(conn, _config_v2)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ ids

    def _status(self, conn: sqlite3.Connection, run_id: str) -> str:
        """The run's status inside an open transaction; an unknown id is a DataError."""
        row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise self._unknown(run_id)
        return row["status"]

    def _unknown(self, run_id: str) -> DataError:
        return DataError(f"no run {run_id} in {self.workspace}; `kdcore runs` lists them")

    @staticmethod
    def _check_id(run_id: str) -> str:
        if not isinstance(run_id, str) or not _ID_RE.match(run_id):
            raise DataError(
                f"{run_id!r} is not a run id; run ids look like 20261127-172600-3fa2c1 "
                "(`kdcore runs` lists them)"
            )
        return run_id

    def resolve_id(self, run_id: str) -> str:
        """The full id for ``run_id`` or a unique prefix of one; DataError otherwise."""
        self._check_id(run_id)
        with self._connect() as conn:
            if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
                return run_id
            rows = conn.execute(
                "SELECT id FROM runs WHERE substr(id, 1, ?) = ? ORDER BY id LIMIT 6",
                (len(run_id), run_id),
            ).fetchall()
        if not rows:
            raise self._unknown(run_id)
        if len(rows) > 1:
            shown = ", ".join(r["id"] for r in rows[:5])
            raise DataError(
                f"run id prefix {run_id} is ambiguous ({shown}{', ...' if len(rows) > 5 else ''}); "
                "type more of the id"
            )
        return rows[0]["id"]

    def _update(self, run_id: str, sql: str, params: tuple[Any, ...]) -> None:
        with self._write() as conn:
            cur = conn.execute(sql, params)
            if cur.rowcount == 0:
                raise self._unknown(run_id)

    # ------------------------------------------------------------------ lifecycle

    def create(self, config: Mapping[str, Any], *, status: str = "queued",
               queue: bool = False) -> str:
        """Store a new run with its full ``config``; returns its id.

        ``strategy``, ``seed`` and ``bundle`` are copied from the config into their own
        columns; the creating process's pid and host are recorded (a ``queued`` run whose
        creator is gone is reaped as interrupted). With ``queue`` no pid is recorded: the run
        waits for the job queue (:mod:`kdcore.store.jobs`), however long its creator lives.
        """
        with self._write() as conn:
            return self._insert(conn, config, status=status, queue=queue)

    def claim(self, config: Mapping[str, Any], *, queue: bool = False,
              reuse: bool = True) -> tuple[str, bool]:
        """The run that produces ``config``, decided and created in one transaction, so two
        commands asking for the same config at once never both train it.

        Returns ``(run_id, True)`` for a run the caller must train: a new one (as
        :meth:`create` makes it) or, without ``queue``, an identical run still waiting in the
        job queue, taken over as :meth:`take_queued` does. ``(run_id, False)`` is an identical
        run that is done (with ``reuse``) or in flight elsewhere: wait for it.
        """
        self.reap_stale()
        key = config_key(config)
        with self._write() as conn:
            if reuse:
                for row in conn.execute(
                        f"SELECT {_RUN_COLUMNS} FROM runs WHERE config_key = ? AND status = 'done'"
                        " ORDER BY finished_at DESC, created_at DESC", (key,)).fetchall():
                    if _row_to_run(row).status == "done":  # not an unreadable one
                        return row["id"], False
            row = conn.execute(
                "SELECT id FROM runs WHERE config_key = ? AND status IN ('queued', 'running')"
                " ORDER BY created_at, id LIMIT 1", (key,)).fetchone()
            if row is not None:
                return row["id"], not queue and self._take(conn, row["id"])
            return self._insert(conn, config, status="queued", queue=queue), True

    def take_queued(self, run_id: str) -> bool:
        """Claim a run waiting in the job queue for this process: its pid is recorded, so the
        run is reaped should this process die before it hands the run on. False when the run
        was cancelled, started or taken since it was listed."""
        with self._write() as conn:
            return self._take(conn, run_id)

    def _take(self, conn: sqlite3.Connection, run_id: str) -> bool:
        pid = os.getpid()
        cur = conn.execute(
            "UPDATE runs SET pid = ?, pid_started = ?, host = ?, updated_at = ? WHERE id = ?"
            " AND status = 'queued' AND pid IS NULL",
            (pid, _pid_start(pid), self._host, _now(), run_id))
        return cur.rowcount == 1

    def _insert(self, conn: sqlite3.Connection, config: Mapping[str, Any], *, status: str,
                queue: bool) -> str:
        """One new row, inside the caller's transaction; returns its id."""
        if not isinstance(config, Mapping):
            raise DataError(f"a run config must be a dict, not {type(config).__name__}")
        if status not in STATUSES:
            raise DataError(f"unknown run status {status!r}; use one of {', '.join(STATUSES)}")
        canonical = _canonical(config)
        config_json = _dumps(dict(config), "run config")
        key = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        seed = config.get("seed")
        if seed is not None:
            try:
                seed = int(seed)
            except (TypeError, ValueError) as exc:
                raise DataError(f"run config seed {seed!r} is not an integer") from exc
        strategy = config.get("strategy")
        bundle = config.get("bundle")
        now = _now()
        pid = None if queue else os.getpid()
        started = now if status == "running" else None
        finished = now if status in TERMINAL_STATUSES else None
        for _ in range(20):
            run_id = _new_run_id()
            try:
                conn.execute(
                    "INSERT INTO runs (id, status, strategy, seed, bundle, config, config_key,"
                    " created_at, started_at, finished_at, updated_at, pid, pid_started, host)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, status, None if strategy is None else str(strategy), seed,
                     None if bundle is None else str(bundle), config_json, key, now,
                     started, finished, now, pid, _pid_start(pid), self._host),
                )
                return run_id
            except sqlite3.IntegrityError:
                continue  # id collision with a run created in the same second: draw again
        raise KDCoreError("could not draw a unique run id after 20 tries")

    def start(self, run_id: str, *, pid: int | None = None) -> None:
        """Mark a run ``running`` by process ``pid`` (default: this one) on this host.

        Raises DataError if the run already finished (done, failed or cancelled).
        """
        pid = os.getpid() if pid is None else int(pid)
        now = _now()
        with self._write() as conn:
            row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise self._unknown(run_id)
            if row["status"] in TERMINAL_STATUSES:
                raise DataError(
                    f"run {run_id} is {row['status']} and cannot be started again; "
                    "create a new run"
                )
            conn.execute(
                "UPDATE runs SET status = 'running', started_at = ?, updated_at = ?, pid = ?,"
                " pid_started = ?, host = ? WHERE id = ?",
                (now, now, pid, _pid_start(pid), self._host, run_id),
            )

    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, Any]) -> None:
        """Store (or replace) the metrics of one epoch."""
        payload = _dumps(dict(metrics), f"epoch {epoch} metrics")
        now = _now()
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO epochs (run_id, epoch, metrics, logged_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (run_id, epoch) DO UPDATE SET metrics = excluded.metrics,"
                    " logged_at = excluded.logged_at",
                    (run_id, int(epoch), payload, now),
                )
                conn.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now, run_id))
        except sqlite3.IntegrityError as exc:  # foreign key: no such run
            raise self._unknown(run_id) from exc

    def epochs(self, run_id: str) -> pd.DataFrame:
        """Per-epoch metrics: column ``epoch`` then one column per metric key, sorted by epoch."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT epoch, metrics FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,)
            ).fetchall()
        records: list[dict[str, Any]] = []
        columns: dict[str, None] = {"epoch": None}
        for row in rows:
            metrics = _loads(row["metrics"])
            if metrics is None:
                continue  # a damaged epoch row: the curve goes on without it
            for key in metrics:
                if key != "epoch":
                    columns.setdefault(key, None)
            records.append({**metrics, "epoch": int(row["epoch"])})
        return pd.DataFrame.from_records(records, columns=list(columns))

    def progress(self, run_id: str, *, step: int, total_steps: int, message: str = "") -> None:
        """Record live progress (visible as ``get(run_id).fraction``). One small UPDATE."""
        self._update(
            run_id,
            "UPDATE runs SET step = ?, total_steps = ?, message = ?, updated_at = ? WHERE id = ?",
            (int(step), int(total_steps), _one_line(message, 500), _now(), run_id),
        )

    def finish(self, run_id: str, metrics: Mapping[str, Any]) -> None:
        """Mark a run ``done`` with its final metrics."""
        payload = _dumps(dict(metrics), "final metrics")
        now = _now()
        self._update(
            run_id,
            "UPDATE runs SET status = 'done', metrics = ?, error = NULL, finished_at = ?,"
            " updated_at = ?, step = COALESCE(total_steps, step) WHERE id = ?",
            (payload, now, now, run_id),
        )

    def fail(self, run_id: str, error: str) -> None:
        """Mark a run ``failed``; ``error`` is stored as one line."""
        now = _now()
        self._update(
            run_id,
            "UPDATE runs SET status = 'failed', error = ?, finished_at = ?, updated_at = ?"
            " WHERE id = ?",
            (_one_line(error) or "failed", now, now, run_id),
        )

    def mark_cancelled(self, run_id: str) -> None:
        """Mark a run ``cancelled`` (the trainer calls this after seeing a cancel request)."""
        now = _now()
        self._update(
            run_id,
            "UPDATE runs SET status = 'cancelled', finished_at = ?, updated_at = ? WHERE id = ?",
            (now, now, run_id),
        )

    def reopen(self, run_id: str, *, queue: bool = False) -> str:
        """Put a stopped run (failed, e.g. interrupted, or cancelled) back to ``running`` by
        this process, or with ``queue`` back in the job queue, to be resumed: its epochs and
        start time are kept; its error, finish time and cancel request are cleared. Accepts a
        unique id prefix; returns the full id. A done run, or one still queued or running, is
        a DataError."""
        self.reap_stale()
        run_id = self.resolve_id(run_id)
        now = _now()
        pid = None if queue else os.getpid()
        with self._write() as conn:
            status = self._status(conn, run_id)
            if status == "done":
                raise DataError(f"run {run_id} is done, so there is nothing to resume; "
                                "train a new run to train longer")
            if status in ("queued", "running"):
                raise DataError(f"run {run_id} is still {status}; only a stopped run (failed, "
                                "interrupted or cancelled) can be resumed")
            conn.execute(
                "UPDATE runs SET status = ?, error = NULL, finished_at = NULL, updated_at = ?,"
                " started_at = COALESCE(started_at, ?), pid = ?, pid_started = ?, host = ?,"
                " cancel_requested = 0 WHERE id = ?",
                ("queued" if queue else "running", now, now, pid, _pid_start(pid), self._host,
                 run_id),
            )
        (self.runs_dir / run_id / CANCEL_FILE).unlink(missing_ok=True)
        return run_id

    # ------------------------------------------------------------------ cancelling

    def request_cancel(self, run_id: str) -> str:
        """Ask the training process to stop: sets the flag and writes ``<artifacts>/CANCEL``.

        Accepts a unique id prefix; returns the full id. The status does not change here:
        the trainer sees the request (:meth:`cancel_requested`), stops and calls
        :meth:`mark_cancelled`. A finished run (or one whose process is gone) raises
        DataError and nothing is written.
        """
        self.reap_stale()
        run_id = self.resolve_id(run_id)
        with self._write() as conn:
            status = self._status(conn, run_id)
            if status in TERMINAL_STATUSES:
                raise DataError(f"run {run_id} has already finished ({status}); there is "
                                "nothing to cancel")
            (self.artifact_dir(run_id) / CANCEL_FILE).write_text(_now() + "\n")
            conn.execute("UPDATE runs SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                         (_now(), run_id))
        return run_id

    def cancel_requested(self, run_id: str) -> bool:
        """True once :meth:`request_cancel` was called. One ``stat`` of the sentinel file."""
        return (self.runs_dir / self._check_id(run_id) / CANCEL_FILE).exists()

    # ------------------------------------------------------------------ reading

    def get(self, run_id: str) -> Run:
        """The run with this id (or unique id prefix); DataError if there is none."""
        self.reap_stale()
        full = self.resolve_id(run_id)
        with self._connect() as conn:
            row = conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (full,)
            ).fetchone()
        if row is None:  # deleted in between
            raise self._unknown(run_id)
        return _row_to_run(row)

    def list(
        self,
        *,
        status: str | Iterable[str] | None = None,
        strategy: str | None = None,
        bundle: str | None = None,
        limit: int | None = None,
    ) -> list[Run]:
        """Runs, newest first, optionally filtered (``status`` may be one or several)."""
        self.reap_stale()
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            bad = [s for s in wanted if s not in STATUSES]
            if bad:
                raise DataError(
                    f"unknown run status {bad[0]!r}; use one of {', '.join(STATUSES)}"
                )
            where.append(f"status IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        if strategy is not None:
            where.append("strategy = ?")
            params.append(strategy)
        if bundle is not None:
            where.append("bundle = ?")
            params.append(bundle)
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._connect() as conn:
            rows = conn.execute(sql, params).fetchall()
        runs = [_row_to_run(r) for r in rows]
        if status is not None:  # an unreadable row reads as failed, whatever it is stored as
            runs = [r for r in runs if r.status in wanted]
        return runs

    def find_done(self, config: Mapping[str, Any]) -> Run | None:
        """The newest ``done`` run whose config is identical to ``config``, else None."""
        key = config_key(config)
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE config_key = ? AND status = 'done'"
                " ORDER BY finished_at DESC, created_at DESC",
                (key,),
            ).fetchall()
        return next((run for run in map(_row_to_run, rows) if run.status == "done"), None)

    # ------------------------------------------------------------------ artifacts

    def artifact_dir(self, run_id: str) -> Path:
        """``<workspace>/runs/<run_id>/``, created on demand (the run must exist)."""
        self._check_id(run_id)
        path = self.runs_dir / run_id
        if not path.is_dir():
            run_id = self.resolve_id(run_id)
            path = self.runs_dir / run_id
            path.mkdir(parents=True, exist_ok=True)
        return path

    def delete(self, run_id: str, *, force: bool = False) -> str:
        """Remove the run's row, its epochs and its artifacts folder; returns the full id.

        Refuses a run that is still ``running`` in a live process unless ``force``.
        """
        self.reap_stale()
        run_id = self.resolve_id(run_id)
        with self._write() as conn:
            if self._status(conn, run_id) == "running" and not force:
                raise DataError(
                    f"run {run_id} is still running; cancel it first (`kdcore runs cancel "
                    f"{run_id}`) or delete with force"
                )
            conn.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        shutil.rmtree(self.runs_dir / run_id, ignore_errors=True)
        return run_id

    # ------------------------------------------------------------------ stale runs

    def _last_log_line(self, run_id: str) -> str:
        """``"; its log ends: ..."`` with the last line of a job's log (why a job died during
        start-up, e.g. an import error), or "" without one."""
        try:
            with (self.runs_dir / run_id / JOB_LOG).open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 4096))
                tail = log.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        return f"; its log ends: {_one_line(lines[-1], 300)}" if lines else ""

    def reap_stale(self) -> list[str]:
        """Mark runs whose process is gone on this host as ``failed`` ("interrupted: ...").

        Looks at ``running`` runs and ``queued`` runs with a pid. Returns the reaped ids.
        """
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT id, status, pid, pid_started FROM runs WHERE host = ? AND pid IS NOT NULL"
                " AND status IN ('running', 'queued')",
                (self._host,),
            ).fetchall()
        dead = [r for r in rows if not _process_alive(int(r["pid"]), r["pid_started"])]
        if not dead:
            return []
        errors = {r["id"]: "interrupted: the training process exited without finishing "
                           f"(pid {r['pid']})" + self._last_log_line(r["id"]) for r in dead}
        reaped: list[str] = []
        now = _now()
        with self._write() as conn:
            for r in dead:
                cur = conn.execute(
                    "UPDATE runs SET status = 'failed', error = ?, finished_at = ?,"
                    " updated_at = ? WHERE id = ? AND status = ? AND pid = ? AND host = ?",
                    (errors[r["id"]], now, now, r["id"], r["status"], r["pid"], self._host),
                )
                if cur.rowcount:
                    reaped.append(r["id"])
        return reaped
