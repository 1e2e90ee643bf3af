"""The job queue: at most N jobs at once, seed-major, no run started twice, the demo queued
like any other run, jobs that outlive their launcher or say why they died, the CLI's workers
gone with a killed CLI, and two identical comparisons training each run once."""

from __future__ import annotations

import contextlib
import json
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
from kdcore.value.compare import plan, run_all, start_demo

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
    # One job process trained all four (no start-up per run), each run's output in its log.
    assert len({r.pid for r in runs}) == 1
    assert all((store.artifact_dir(r.id) / jobs.LOG_FILE).exists() for r in runs)
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
    (progress,) = [p.proto.text for p in at.get("progress")]
    assert progress.startswith(f"0 of {total} runs done · 2 running · {total - 2} queued · ")
    assert "after the first run" in progress  # no duration to estimate from yet


def _group(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (zombies, awaiting their reaper, are not)."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


TRAIN_2 = ["train", "--nproc", "2", "--strategy", "kd"]
COMPARE_2 = ["compare", "--strategies", "kd,ce", "--seeds", "1", "--workers", "2"]
# A shell starts a background command (`kdcore train ... &` in a script) with SIGINT ignored,
# and so are its children: torch's own "SIGINT at the parent's death" does not stop them.
AS_A_BACKGROUND_JOB = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                       "os.execv(sys.executable, [sys.executable, '-m', 'kdcore', *sys.argv[1:]])")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize(("command", "moment"), [
    (TRAIN_2, "training"), (TRAIN_2, "starting"), (COMPARE_2, "training"),
], ids=["train-nproc-2-training", "train-nproc-2-starting", "compare-training"])
def test_a_killed_cli_leaves_no_process_behind(tmp_path, command, moment):
    """kill -9 of the command, while its two workers (DDP ranks, pool workers) start up or
    train: they die with it, and so does the rest of its process group."""
    cli = subprocess.Popen(
        [sys.executable, "-c", AS_A_BACKGROUND_JOB, *command, "--epochs", "100000", "--quiet",
         "--workspace", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    store = RunStore(tmp_path)

    def ready() -> bool:
        if moment == "starting":  # the command, the resource tracker and two workers
            return len(_group(cli.pid)) >= 4
        return any(r.step > 0 for r in store.list(status="running"))

    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not ready():
            assert cli.poll() is None, "the command ended before its workers started"
            time.sleep(0.05)
        assert len(_group(cli.pid)) >= 3  # the command and at least its two workers
        cli.kill()
        cli.wait()
        deadline = time.monotonic() + 60  # a worker still importing torch ends after that
        while _group(cli.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _group(cli.pid) == []
        assert {r.status for r in store.list()} <= {"failed"}  # reaped as interrupted
    finally:  # whatever happened, nothing of it outlives the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cli.pid, signal.SIGKILL)
        cli.wait()


def test_two_identical_compares_at_once_train_every_run_once(tmp_path):
    argv = [sys.executable, "-m", "kdcore", "compare", "--strategies", "kd,ce", "--seeds", "1",
            "--epochs", "2", "--workers", "2", "--quiet", "--json", "--workspace", str(tmp_path)]
    clis = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True) for _ in range(2)]
    try:
        outs = [cli.communicate(timeout=JOBS_S) for cli in clis]
    finally:
        for cli in clis:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
    assert [cli.returncode for cli in clis] == [0, 0], [err[-2000:] for _, err in outs]
    docs = [json.loads(out) for out, _ in outs]
    runs = RunStore(tmp_path).list()
    assert sorted((r.strategy, r.status) for r in runs) == [("ce", "done"), ("kd", "done")]
    for name in ("kd", "ce"):
        assert docs[0]["strategies"][name] == docs[1]["strategies"][name]
    assert sum(doc["reused_runs"] for doc in docs) == 2  # each run trained by one of them


CLAIM_AND_HOLD = """
import json, sys, time
from kdcore.store.runs import RunStore
print(RunStore(sys.argv[1]).claim(json.loads(sys.argv[2]))[0], flush=True)
time.sleep(300)
"""


def test_compare_trains_a_run_it_waited_for_once_its_command_is_gone(bundle, tmp_path):
    config = plan(bundle, ["kd"], [0], epochs=1)[0]
    holder = subprocess.Popen([sys.executable, "-c", CLAIM_AND_HOLD, str(tmp_path),
                               json.dumps(config.to_dict())], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    killer = threading.Timer(3, holder.kill)
    try:
        first = holder.stdout.readline().strip()
        assert first, "the holder claimed nothing"
        killer.start()  # while run_all waits for the holder's run
        [run] = run_all(RunStore(tmp_path), [config], workers=1)
    finally:
        killer.cancel()
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert run.status == "done" and run.id != first
    assert RunStore(tmp_path).get(first).error.startswith("interrupted:")


def test_a_job_that_dies_during_start_up_is_reaped_with_the_reason(bundle, tmp_path,
                                                                   monkeypatch):
    site = tmp_path / "broken_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("raise SystemExit('a broken install')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    store = RunStore(tmp_path)
    run_id = jobs.start_job(plan(bundle, ["kd"], [0], epochs=1)[0], workspace=tmp_path)
    deadline = time.monotonic() + 60
    while not store.get(run_id).finished and time.monotonic() < deadline:
        time.sleep(0.2)
    run = store.get(run_id)
    assert run.status == "failed"
    assert run.error.startswith("interrupted:")
    assert run.error.endswith("its log ends: SystemExit: a broken install")


START_AND_EXIT = """
import sys
from kdcore.data.bundles import load_bundle
from kdcore.learning.train import TrainConfig
from kdcore.store.jobs import start_job
config = TrainConfig.for_bundle(load_bundle(), strategy="kd", epochs=1)
print(start_job(config, workspace=sys.argv[1]), flush=True)
"""


def test_a_job_outlives_the_process_that_started_it(tmp_path):
    run_id = subprocess.run([sys.executable, "-c", START_AND_EXIT, str(tmp_path)],
                            capture_output=True, text=True, check=True).stdout.strip()
    store = RunStore(tmp_path)
    deadline = time.monotonic() + JOBS_S
    while not store.get(run_id).finished and time.monotonic() < deadline:
        time.sleep(0.2)
    run = store.get(run_id)
    assert run.status == "done", run.error


def test_the_workspace_is_the_flag_then_kdcore_home_then_dot_kdcore(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path / "home"))
    assert kdcore_workspace.resolve_workspace(tmp_path / "flag") == tmp_path / "flag"
    assert kdcore_workspace.resolve_workspace() == tmp_path / "home"
    monkeypatch.delenv("KDCORE_HOME")
    assert kdcore_workspace.resolve_workspace(create=False) == tmp_path / ".kdcore"
    assert not (tmp_path / ".kdcore").exists()  # readers leave no folder behind
    assert RunStore().workspace == tmp_path / ".kdcore"
