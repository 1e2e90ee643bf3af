"""The job queue: at most N jobs at once, seed-major, no run started twice, the demo queued
like any other run, and the CLI's workers gone with a killed CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from kdcore import workspace as kdcore_workspace
from kdcore.data.bundles import load_bundle
from kdcore.learning.strategies import DEFAULT_STRATEGIES
from kdcore.store import jobs
from kdcore.store.runs import RunStore
from kdcore.store.selection import DEMO_SEEDS
from kdcore.value.compare import plan, start_demo

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
JOBS_S = 300  # four job processes one after the other, on a busy CI machine


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(None)


@pytest.fixture
def no_processes(monkeypatch) -> list[str]:
    """Jobs "start" in this process instead of a new one (so they stay running); returns the
    ids started, in order."""
    started: list[str] = []

    def spawn(store: RunStore, run_id: str, max_jobs: int) -> int:
        time.sleep(0.02)  # a real spawn takes a while: room for a second launcher to race
        started.append(run_id)
        return os.getpid()

    monkeypatch.setattr(jobs, "_spawn", spawn)
    return started


def _time(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def test_queued_runs_train_one_at_a_time_seed_major_and_all_finish(bundle, tmp_path):
    store = RunStore(tmp_path)
    configs = plan(bundle, ["kd", "ce"], range(2), epochs=1)  # strategy-major, as planned
    ids = jobs.queue_runs(configs, workspace=tmp_path, max_jobs=1)
    assert [(store.get(i).strategy, store.get(i).seed) for i in ids] == [
        ("kd", 0), ("ce", 0), ("kd", 1), ("ce", 1)]
    deadline = time.monotonic() + JOBS_S
    most_running = 0
    while time.monotonic() < deadline:
        runs = [store.get(i) for i in ids]
        most_running = max(most_running, sum(r.status == "running" for r in runs))
        if all(r.finished for r in runs):
            break
        time.sleep(0.2)
    runs = [store.get(i) for i in ids]
    assert [r.status for r in runs] == ["done"] * 4, [r.error for r in runs]
    assert most_running == 1
    for earlier, later in pairwise(runs):  # each starts after the one before finished
        assert _time(later.started_at) >= _time(earlier.finished_at)
    assert jobs.queue_runs(configs, workspace=tmp_path, max_jobs=1) == []  # all reused


def test_two_launchers_at_once_never_start_a_run_twice(tmp_path, no_processes):
    store = RunStore(tmp_path)
    for seed in range(6):
        store.create({"strategy": "kd", "seed": seed}, queue=True)
    barrier = threading.Barrier(4)

    def launch() -> None:
        barrier.wait()
        jobs.start_queued(tmp_path, max_jobs=3)

    threads = [threading.Thread(target=launch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(no_processes) == len(set(no_processes)) == 3
    assert sorted(store.get(i).seed for i in no_processes) == [0, 1, 2]  # the oldest first
    assert sorted(r.status for r in store.list()) == ["queued"] * 3 + ["running"] * 3


def test_queued_runs_wait_for_the_queue_after_their_creator_is_gone(tmp_path):
    store = RunStore(tmp_path)
    run_id = subprocess.run(
        [sys.executable, "-c", "import sys; from kdcore.store.runs import RunStore; "
         "print(RunStore(sys.argv[1]).create({'strategy': 'kd'}, queue=True))", str(tmp_path)],
        capture_output=True, text=True, check=True).stdout.strip()
    assert store.get(run_id).status == "queued"  # not reaped as interrupted


def test_plan_work_leaves_out_runs_in_flight_and_finished_ones(bundle, tmp_path):
    store = RunStore(tmp_path)
    flying, finished, new = plan(bundle, ["kd"], range(3), epochs=1)
    store.create(flying.to_dict())
    done = store.create(finished.to_dict())
    store.start(done)
    store.finish(done, {"test_accuracy": 0.5})
    work = jobs.plan_work(store, [flying, finished, new])
    assert (work.todo, work.in_flight, work.reused) == ([new], 1, 1)
    work = jobs.plan_work(store, [flying, finished, new], reuse=False)
    assert (work.todo, work.in_flight, work.reused) == ([finished, new], 1, 0)


def test_the_demo_is_queued_seed_major_without_finished_runs(bundle, tmp_path, no_processes):
    store = RunStore(tmp_path)
    finished = plan(bundle, ["kd"], [0])[0]
    done = store.create(finished.to_dict())
    store.start(done)
    store.finish(done, {"test_accuracy": 0.5})

    ids = start_demo(tmp_path, max_jobs=2)
    runs = [store.get(i) for i in ids]
    expected = [(s, seed) for seed in range(DEMO_SEEDS) for s in DEFAULT_STRATEGIES]
    assert [(r.strategy, r.seed) for r in runs] == [p for p in expected if p != ("kd", 0)]
    assert no_processes == ids[:2]
    assert start_demo(tmp_path, max_jobs=2) == []  # every run is finished or in flight


def test_overview_demo_button_queues_the_demo_as_jobs(tmp_path, monkeypatch, no_processes):
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path))
    monkeypatch.setattr(jobs, "default_max_jobs", lambda: 2)
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.switch_page("app_pages/overview.py")
    at.run()
    at.button(key="overview_run_demo").click().run()
    assert not at.exception and not at.error
    total = len(DEFAULT_STRATEGIES) * DEMO_SEEDS
    assert len(RunStore(tmp_path).list(status="queued")) == total - 2
    assert [p.proto.text for p in at.get("progress")] == [
        f"0 of {total} runs done · 2 running · {total - 2} queued"]


def test_a_killed_cli_leaves_no_worker_training(tmp_path):
    cli = subprocess.Popen(
        [sys.executable, "-m", "kdcore", "compare", "--strategies", "kd", "--seeds", "1",
         "--workers", "1", "--epochs", "100000", "--quiet", "--workspace", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = RunStore(tmp_path)
    worker = None
    try:
        deadline = time.monotonic() + 120
        while worker is None and time.monotonic() < deadline:
            running = store.list(status="running")
            worker = running[0].pid if running else None
            time.sleep(0.2)
        assert worker is not None and worker != cli.pid
        cli.kill()
        cli.wait()
        deadline = time.monotonic() + 20
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker)
    finally:
        cli.kill()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, awaiting its reaper, has stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def test_the_workspace_is_the_flag_then_kdcore_home_then_dot_kdcore(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path / "home"))
    assert kdcore_workspace.resolve_workspace(tmp_path / "flag") == tmp_path / "flag"
    assert kdcore_workspace.resolve_workspace() == tmp_path / "home"
    monkeypatch.delenv("KDCORE_HOME")
    assert kdcore_workspace.resolve_workspace(create=False) == tmp_path / ".kdcore"
    assert not (tmp_path / ".kdcore").exists()  # readers leave no folder behind
    assert RunStore().workspace == tmp_path / ".kdcore"
