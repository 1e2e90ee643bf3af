"""The run store: lifecycle, reuse, deletion, ids, concurrency and crash recovery."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kdcore.errors import DataError
from kdcore.store.runs import (
    SCHEMA_VERSION,
    STATUSES,
    Run,
    RunStore,
    config_key,
    resolve_workspace,
    to_frame,
)

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _config(seed: int = 0, **extra) -> dict:
    return {"strategy": "kd+be", "seed": seed, "bundle": "cifar-mini", "epochs": 3,
            "lr": 0.01, **extra}


# --------------------------------------------------------------------------- lifecycle


def test_lifecycle_queued_running_done_keeps_config_metrics_and_epochs(tmp_path):
    store = RunStore(tmp_path)
    config = _config(seed=3)
    run_id = store.create(config)

    run = store.get(run_id)
    assert isinstance(run, Run)
    assert run.status == "queued"
    assert (run.strategy, run.seed, run.bundle) == ("kd+be", 3, "cifar-mini")
    assert run.config == config
    assert run.pid == os.getpid()
    assert run.created_at.endswith("+00:00") and run.started_at is None

    store.start(run_id)
    run = store.get(run_id)
    assert run.status == "running" and run.started_at is not None and run.host

    for epoch in range(3):
        store.log_epoch(run_id, epoch, {"loss": 1.0 / (epoch + 1),
                                        "test_accuracy": np.float32(0.5 + epoch / 10)})
    store.finish(run_id, {"test_accuracy": 0.71, "per_class": np.array([0.5, 0.9]),
                          "bias_inheritance": 0.25})

    run = store.get(run_id)
    assert run.status == "done" and run.finished and run.error is None
    assert run.finished_at >= run.started_at
    assert run.metrics == {"test_accuracy": 0.71, "per_class": [0.5, 0.9],
                           "bias_inheritance": 0.25}
    assert run.fraction == 1.0

    frame = store.epochs(run_id)
    assert list(frame.columns) == ["epoch", "loss", "test_accuracy"]
    assert frame["epoch"].tolist() == [0, 1, 2]
    assert frame["test_accuracy"].tolist() == pytest.approx([0.5, 0.6, 0.7])


def test_log_epoch_twice_replaces_that_epoch(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create(_config())
    store.log_epoch(run_id, 0, {"loss": 2.0})
    store.log_epoch(run_id, 0, {"loss": 1.5, "acc": 0.3})
    frame = store.epochs(run_id)
    assert len(frame) == 1
    assert frame.loc[0, "loss"] == 1.5 and frame.loc[0, "acc"] == 0.3


def test_epochs_of_run_without_epochs_is_empty_frame_with_epoch_column(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create(_config())
    frame = store.epochs(run_id)
    assert frame.empty and list(frame.columns) == ["epoch"]


def test_progress_is_visible_as_fraction_in_get(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create(_config())
    assert store.get(run_id).fraction is None
    store.start(run_id)
    store.progress(run_id, step=25, total_steps=100, message="epoch 1/4\nbatch 25")
    run = store.get(run_id)
    assert (run.step, run.total_steps) == (25, 100)
    assert run.fraction == pytest.approx(0.25)
    assert "\n" not in run.message and "epoch 1/4" in run.message


def test_fail_stores_error_as_one_line(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create(_config())
    store.start(run_id)
    store.fail(run_id, "Traceback ...\n  boom\nValueError: bad shape")
    run = store.get(run_id)
    assert run.status == "failed" and run.finished_at is not None
    assert "\n" not in run.error and "ValueError: bad shape" in run.error


def test_start_refuses_a_finished_run(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create(_config())
    store.mark_cancelled(run_id)
    with pytest.raises(DataError, match="cancelled"):
        store.start(run_id)


def test_writes_to_unknown_run_raise_data_error(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(DataError, match="no run nope"):
        store.log_epoch("nope", 0, {"loss": 1.0})
    with pytest.raises(DataError, match="no run nope"):
        store.finish("nope", {})


def test_non_json_config_is_a_data_error(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(DataError, match="JSON"):
        store.create({"strategy": "kd", "seed": 0, "model": object()})


# --------------------------------------------------------------------------- reuse


def test_find_done_reuses_only_an_identical_finished_config(tmp_path):
    store = RunStore(tmp_path)
    config = _config(seed=1)
    assert store.find_done(config) is None

    queued = store.create(config)
    assert store.find_done(config) is None  # not finished yet

    done = store.create(config)
    store.start(done)
    store.finish(done, {"test_accuracy": 0.8})
    store.fail(queued, "crashed")

    reordered = dict(reversed(list(config.items())))  # key order does not matter
    assert config_key(reordered) == config_key(config)
    found = store.find_done(reordered)
    assert found is not None and found.id == done

    assert store.find_done(_config(seed=2)) is None
    assert store.find_done(_config(seed=1, lr=0.02)) is None
    assert store.find_done({k: v for k, v in config.items() if k != "bundle"}) is None


def test_find_done_returns_the_newest_of_several(tmp_path):
    store = RunStore(tmp_path)
    ids = []
    for _ in range(2):
        run_id = store.create(_config())
        store.finish(run_id, {"test_accuracy": 0.5})
        ids.append(run_id)
    assert store.find_done(_config()).id == ids[-1]


# --------------------------------------------------------------------------- ids, listing


def test_run_ids_are_short_sortable_and_unique(tmp_path):
    store = RunStore(tmp_path)
    ids = [store.create(_config(seed=i)) for i in range(30)]
    assert len(set(ids)) == 30
    assert all(len(i) == len("20261127-172600-3fa2c1") for i in ids)
    prefixes = [i[:15] for i in ids]
    assert prefixes == sorted(prefixes)  # time-based prefix


def test_list_is_newest_first_and_filters(tmp_path):
    store = RunStore(tmp_path)
    a = store.create({"strategy": "kd", "seed": 0, "bundle": "x"})
    b = store.create({"strategy": "dkd", "seed": 0, "bundle": "y"})
    c = store.create({"strategy": "kd", "seed": 1, "bundle": "y"})
    store.finish(c, {"test_accuracy": 0.9})

    assert [r.id for r in store.list()] == [c, b, a]
    assert [r.id for r in store.list(strategy="kd")] == [c, a]
    assert [r.id for r in store.list(bundle="y")] == [c, b]
    assert [r.id for r in store.list(status="done")] == [c]
    assert [r.id for r in store.list(status=["queued", "done"], strategy="kd")] == [c, a]
    with pytest.raises(DataError, match="unknown run status"):
        store.list(status="finished")

    frame = to_frame(store.list())
    assert isinstance(frame, pd.DataFrame)
    assert frame["id"].tolist() == [c, b, a]
    for col in ("id", "created_at", "strategy", "seed", "status", "test_accuracy"):
        assert col in frame.columns
    assert frame.loc[0, "test_accuracy"] == 0.9
    assert np.isnan(frame.loc[1, "test_accuracy"])
    assert list(RunStore.to_frame([]).columns) == list(frame.columns)
    assert set(STATUSES) == {"queued", "running", "done", "failed", "cancelled"}


def test_unknown_id_error_is_one_line_and_names_workspace(tmp_path):
    store = RunStore(tmp_path)
    store.create(_config())
    with pytest.raises(DataError) as info:
        store.get("19990101-000000-abcdef")
    message = str(info.value)
    assert message == (
        f"no run 19990101-000000-abcdef in {store.workspace}; `kdcore runs` lists them"
    )
    assert "\n" not in message


def test_unique_prefix_finds_the_run_and_ambiguous_prefix_errors(tmp_path):
    store = RunStore(tmp_path)
    first = store.create(_config(seed=0))
    second = store.create(_config(seed=1))
    shared = len(os.path.commonprefix([first, second]))
    assert store.get(first[: shared + 1]).id == first
    assert store.get(second[: shared + 1]).id == second
    with pytest.raises(DataError, match="ambiguous") as info:
        store.get(first[:shared])
    assert first in str(info.value) and second in str(info.value)
    with pytest.raises(DataError, match="not a run id"):
        store.get("../etc")


# --------------------------------------------------------------------------- artifacts


def test_delete_removes_row_epochs_and_artifacts(tmp_path):
    store = RunStore(tmp_path)
    keep = store.create(_config(seed=0))
    run_id = store.create(_config(seed=1))
    store.log_epoch(run_id, 0, {"loss": 1.0})
    folder = store.artifact_dir(run_id)
    assert folder == tmp_path.resolve() / "runs" / run_id and folder.is_dir()
    (folder / "predictions.parquet").write_bytes(b"x")
    (folder / "nested").mkdir()
    (folder / "nested" / "w.pt").write_bytes(b"y")

    assert store.delete(run_id[:20]) == run_id
    assert not folder.exists()
    with pytest.raises(DataError, match="no run"):
        store.get(run_id)
    assert [r.id for r in store.list()] == [keep]
    with sqlite3.connect(store.db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 0


def test_delete_refuses_a_live_running_run_unless_forced(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create(_config())
    store.start(run_id)
    with pytest.raises(DataError, match="still running"):
        store.delete(run_id)
    store.delete(run_id, force=True)
    assert store.list() == []


def test_artifact_dir_of_unknown_run_is_an_error(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(DataError, match="no run"):
        store.artifact_dir("20000101-000000-000000")


# --------------------------------------------------------------------------- cancelling


def test_cancel_request_round_trip(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create(_config())
    store.start(run_id)
    assert store.cancel_requested(run_id) is False
    assert store.get(run_id).cancel_requested is False

    assert store.request_cancel(run_id[:18]) == run_id
    assert store.cancel_requested(run_id) is True
    assert (store.artifact_dir(run_id) / "CANCEL").exists()  # the trainer's cheap check
    assert store.get(run_id).cancel_requested is True
    assert store.get(run_id).status == "running"  # the trainer decides when to stop

    # another store object on the same workspace (e.g. the trainer process) sees it too
    assert RunStore(tmp_path).cancel_requested(run_id) is True
    store.mark_cancelled(run_id)
    run = store.get(run_id)
    assert run.status == "cancelled" and run.finished_at is not None


@pytest.mark.parametrize("end", ["finish", "fail", "mark_cancelled"])
def test_cancelling_a_finished_run_says_so_and_writes_nothing(tmp_path, end):
    store = RunStore(tmp_path)
    run_id = store.create(_config())
    store.start(run_id)
    getattr(store, end)(run_id, *({"finish": [{"test_accuracy": 0.5}], "fail": ["boom"]}
                                  .get(end, [])))
    status = store.get(run_id).status
    out = subprocess.run([sys.executable, "-m", "kdcore", "runs", "cancel", run_id,
                          "--workspace", str(tmp_path)], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"error: run {run_id} has already finished ({status}); there is nothing to cancel"]
    assert not (tmp_path / "runs" / run_id / "CANCEL").exists()
    assert not store.get(run_id).cancel_requested


# --------------------------------------------------------------------------- claiming


def test_claim_reuses_a_done_run_joins_one_in_flight_and_takes_over_a_queued_one(tmp_path):
    store = RunStore(tmp_path)
    done = store.create(_config(0))
    store.start(done)
    store.finish(done, {"test_accuracy": 0.5})
    assert store.claim(_config(0)) == (done, False)
    new, mine = store.claim(_config(0), reuse=False)
    assert mine and new != done
    assert store.claim(_config(0), reuse=False) == (new, False)  # in flight: wait for it

    queued = store.create(_config(1), queue=True)  # waiting for the job queue (no pid)
    assert store.claim(_config(1), queue=True) == (queued, False)  # queued once is enough
    assert store.claim(_config(1)) == (queued, True)  # a CLI trains it itself...
    run = store.get(queued)
    assert (run.status, run.pid) == ("queued", os.getpid())
    assert not store.take_queued(queued)  # ...and no job launcher starts it again


def test_claims_at_once_create_one_run(tmp_path):
    RunStore(tmp_path)  # the schema, before the race
    barrier = threading.Barrier(8)
    claims: list[tuple[str, bool]] = []

    def claim() -> None:
        store = RunStore(tmp_path)
        barrier.wait()
        claims.append(store.claim(_config(7)))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({run_id for run_id, _ in claims}) == 1
    assert sorted(mine for _, mine in claims) == [False] * 7 + [True]
    assert len(RunStore(tmp_path).list()) == 1


# --------------------------------------------------------------------------- workspace


def test_kdcore_home_env_sets_the_default_workspace(tmp_path, monkeypatch):
    home = tmp_path / "home" / "ws"
    monkeypatch.setenv("KDCORE_HOME", str(home))
    store = RunStore()
    assert store.workspace == home.resolve()
    assert (home / "runs.sqlite").exists()
    explicit = tmp_path / "explicit"
    assert resolve_workspace(explicit) == explicit.resolve()  # an explicit path wins

    monkeypatch.delenv("KDCORE_HOME")
    monkeypatch.chdir(tmp_path)
    assert resolve_workspace() == (tmp_path / ".kdcore").resolve()
    assert (tmp_path / ".kdcore").is_dir()


def test_workspace_that_is_a_file_is_a_data_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(DataError, match="is a file"):
        RunStore(target)


def test_store_uses_wal_and_versioned_schema(tmp_path):
    store = RunStore(tmp_path)
    with sqlite3.connect(store.db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    RunStore(tmp_path)  # reopening an existing store is fine


def test_store_from_a_newer_kdcore_is_refused(tmp_path):
    store = RunStore(tmp_path)
    with sqlite3.connect(store.db_path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(DataError, match="newer"):
        RunStore(tmp_path)


# --------------------------------------------------------------------------- processes

_WORKER = r"""
import sys, time
from pathlib import Path
from kdcore.store.runs import RunStore
workspace, go, worker = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
(go.parent / f"ready-{worker}").touch()
while not go.exists():
    time.sleep(0.002)
store = RunStore(workspace)
for i in range(25):
    run_id = store.create({"strategy": "kd", "seed": i, "worker": worker})
    store.start(run_id)
    for epoch in range(10):
        store.log_epoch(run_id, epoch, {"loss": 1.0 / (epoch + 1), "worker": worker})
        store.progress(run_id, step=epoch + 1, total_steps=10)
    store.finish(run_id, {"test_accuracy": 0.5})
print("ok")
"""


def test_four_processes_writing_at_once_never_lock_and_lose_nothing(tmp_path):
    workspace = tmp_path / "ws"  # fresh: the schema set-up itself races too
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(workspace), str(go), str(n)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        )
        for n in range(4)
    ]
    deadline = time.monotonic() + 30  # let them all import, then release them together
    while time.monotonic() < deadline and not all(
        (tmp_path / f"ready-{n}").exists() for n in range(4)
    ):
        time.sleep(0.01)
    go.write_text("go")
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip() == "ok"

    store = RunStore(workspace)
    runs = store.list()
    assert len(runs) == 100
    assert {r.status for r in runs} == {"done"}
    assert len({r.id for r in runs}) == 100
    assert sorted((r.config["worker"], r.seed) for r in runs) == [
        (w, s) for w in range(4) for s in range(25)
    ]
    with sqlite3.connect(store.db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 1000
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


_SLEEPER = r"""
import sys, time
from kdcore.store.runs import RunStore
store = RunStore(sys.argv[1])
run_id = store.create({"strategy": "kd", "seed": 0})
store.start(run_id)
store.log_epoch(run_id, 0, {"loss": 1.0})
print(run_id, flush=True)
time.sleep(120)
"""


def _start_sleeper(workspace: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLEEPER, str(workspace)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    run_id = proc.stdout.readline().strip()
    assert run_id, proc.stderr.read() if proc.poll() is not None else "no run id"
    return proc, run_id


def test_killed_training_process_leaves_run_failed_as_interrupted(tmp_path):
    store = RunStore(tmp_path)
    proc, run_id = _start_sleeper(tmp_path)
    try:
        assert store.get(run_id).status == "running"  # alive: not reaped
        assert store.reap_stale() == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()

    runs = store.list()
    assert [r.id for r in runs] == [run_id]
    run = runs[0]
    assert run.status == "failed"
    assert run.error == (
        f"interrupted: the training process exited without finishing (pid {proc.pid})"
    )
    assert run.finished_at is not None
    assert store.epochs(run_id)["loss"].tolist() == [1.0]
    with sqlite3.connect(store.db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_zombie_training_process_counts_as_dead(tmp_path):
    store = RunStore(tmp_path)
    proc, run_id = _start_sleeper(tmp_path)
    try:
        proc.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # killed but not waited for: a zombie
            state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                break
            time.sleep(0.01)
        assert state == "Z"
        run = store.get(run_id)
        assert run.status == "failed" and run.error.startswith("interrupted:")
    finally:
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_reaper_leaves_live_and_other_host_runs_alone(tmp_path):
    store = RunStore(tmp_path)
    mine = store.create(_config(seed=0))  # queued by this live process
    other = store.create(_config(seed=1))
    store.start(other)
    with sqlite3.connect(store.db_path) as conn:
        conn.execute("UPDATE runs SET host = 'elsewhere', pid = 999999999 WHERE id = ?",
                     (other,))
    assert store.reap_stale() == []
    assert store.get(mine).status == "queued"
    assert store.get(other).status == "running"


def test_threads_sharing_one_store_write_at_once(tmp_path):
    store = RunStore(tmp_path)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(25):
                run_id = store.create({"strategy": "kd", "seed": i, "worker": worker})
                store.log_epoch(run_id, 0, {"loss": 1.0})
                store.finish(run_id, {"test_accuracy": 0.5})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(store.list(status="done")) == 100


def _forked_create(store: RunStore, queue) -> None:
    run_id = store.create({"strategy": "kd", "seed": 7})
    store.finish(run_id, {"test_accuracy": 0.1})
    queue.put(run_id)


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_store_keeps_working_in_a_forked_child(tmp_path):
    store = RunStore(tmp_path)
    parent_run = store.create(_config())
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_forked_create, args=(store, queue))
    child.start()
    child_run = queue.get(timeout=20)
    child.join(timeout=20)
    assert child.exitcode == 0
    assert store.get(child_run).status == "done"
    store.finish(parent_run, {"test_accuracy": 0.2})  # the parent's connection still works
    assert {r.id for r in store.list(status="done")} == {parent_run, child_run}


def test_store_recovers_when_the_workspace_is_removed(tmp_path):
    workspace = tmp_path / "ws"
    store = RunStore(workspace)
    store.create(_config())
    shutil.rmtree(workspace)
    assert store.list() == []
    run_id = store.create(_config())
    assert store.get(run_id).status == "queued"


def test_store_pickles_to_the_same_workspace(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create(_config())
    copy = pickle.loads(pickle.dumps(store))
    assert copy.workspace == store.workspace
    assert copy.get(run_id).id == run_id
