"""Training jobs: queue runs, start them a few at a time in detached processes, cancel them.

A queued run is a row with status ``queued`` and no pid (``RunStore.create(queue=True)``).
:func:`start_queued` claims the oldest ones, under a lock file so two launchers never start the
same run, and starts each in its own detached ``python -m kdcore job RUN_ID`` process while
fewer than ``max_jobs`` (default: one per core) run on this host. A job that finishes its run
takes the next queued one itself (:func:`run_job`), and calls :func:`start_queued` when the
queue is empty for it, so the queue drains by itself: no daemon, no open app or browser tab
needed.
Progress, per-epoch metrics and the final result go to the run store, so any reader sees them;
:func:`cancel_job` asks a job to stop (it checks between batches).

The CLI trains in its own process pool instead (:func:`kdcore.value.compare.run_all`); its
workers call :func:`kdcore.learning.distributed.exit_with_parent`, so a killed CLI leaves none
behind. Job processes do not: they outlive the app that started them, on purpose.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcore.data.bundles import load_dataset
from kdcore.errors import DataError, KDCoreError
from kdcore.errors import report as report_error
from kdcore.learning.allocator import keep_freed_memory
from kdcore.learning.distributed import init_process_group, rank_and_world, shutdown
from kdcore.learning.train import Cancelled, TrainConfig, save_artifacts, train_student
from kdcore.store import overrides as label_overrides
from kdcore.store.runs import JOB_LOG as LOG_FILE  # a job's output, in its run's folder
from kdcore.store.runs import RunStore, config_key

LOCK_FILE = "jobs.lock"
CHECKPOINT_DIR = "checkpoints"  # an image run's last.pt and best.pt, in its artifacts


def execute_run(run_id: str, *, workspace: str | Path | None = None, threads: int = 1,
                on_step: Callable[[int, int], None] | None = None,
                loader_workers: int | None = None) -> dict:
    """Train a queued run in this process and record everything; returns its final metrics.

    One thread per run: the bundled models are small, and several runs in parallel processes
    use the cores better than one run on many threads. Under torch.distributed every rank
    calls this; only rank 0 writes to the store. An image run checkpoints every epoch into
    its artifacts and, when a checkpoint is there already (see :func:`resume_run`), goes on
    from it; ``loader_workers`` (not stored with the run) decode its images.
    """
    torch.set_num_threads(threads)
    keep_freed_memory()  # no page faults for the same tensors every step (learning.allocator)
    lead = rank_and_world()[0] == 0
    store = RunStore(workspace)
    run = store.get(run_id)
    config = TrainConfig(**run.config)
    if loader_workers is not None:
        config.loader_workers = loader_workers
    if lead:
        store.start(run.id)
    pace = _Pace()

    def on_progress(step: int, total: int, metrics: dict | None) -> None:
        eta = pace.eta(step, total)
        if metrics is None:
            store.progress(run.id, step=step, total_steps=total)
        else:
            store.log_epoch(run.id, metrics["epoch"], metrics)
            store.progress(run.id, step=step, total_steps=total,
                           message=f"epoch {metrics['epoch'] + 1}/{config.epochs}{eta}")
        if on_step is not None:
            on_step(step, total)

    progress = dict(on_progress=on_progress if lead else None,
                    should_cancel=(lambda: store.cancel_requested(run.id)) if lead else None)
    try:
        if config.student_arch:
            from kdcore.learning.image_train import CHECKPOINTS, train_images

            checkpoints = store.runs_dir / run.id / CHECKPOINT_DIR
            bundle = None
            model, result, metrics = train_images(
                config, checkpoint_dir=checkpoints,
                resume=(checkpoints / CHECKPOINTS[0]).is_file(), **progress)
        else:
            bundle = load_dataset(config.bundle, **config.data_options)
            model, result, metrics = train_student(config, bundle, **progress)
        metrics["strategy"], metrics["seed"] = config.strategy, config.seed
        if lead:
            save_artifacts(store.artifact_dir(run.id), model, result, bundle)
            store.finish(run.id, metrics)
        return metrics
    except Cancelled:
        if lead:
            store.mark_cancelled(run.id)
        raise
    except KDCoreError as exc:
        if lead:
            store.fail(run.id, str(exc))
        raise
    except Exception as exc:  # recorded, then re-raised for the caller to report
        if lead:
            store.fail(run.id, f"internal error: {type(exc).__name__}: {exc}")
        raise


class _Pace:
    """The time left, from the pace of the steps trained since the first report in this
    process (a resumed run's earlier steps are not this process's pace)."""

    def __init__(self) -> None:
        self.start: tuple[float, int] | None = None

    def eta(self, step: int, total: int) -> str:
        now = time.perf_counter()
        if self.start is None or step <= self.start[1]:
            self.start = self.start or (now, step)
            return ""
        left = (now - self.start[0]) / (step - self.start[1]) * (total - step)
        minutes, seconds = divmod(round(left), 60)
        hours, minutes = divmod(minutes, 60)
        return ", ETA " + (f"{hours}h {minutes:02d}m" if hours else
                           f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s")


def resume_run(run_id: str, *, workspace: str | Path | None = None,
               queue: bool = False) -> str:
    """Reopen a stopped image run (interrupted, failed or cancelled) that has a checkpoint, to
    train on from it: for this process (then call :func:`execute_run`), or with ``queue`` as
    a background job. Returns the full id; a DataError names why a run cannot be resumed."""
    from kdcore.learning.image_train import CHECKPOINTS

    store = RunStore(workspace)
    run = store.get(run_id)
    if run.status == "done":
        raise DataError(f"run {run.id} is done, so there is nothing to resume; train a new run "
                        "to train longer")
    if not (run.config or {}).get("student_arch"):
        raise DataError(f"run {run.id} trained on {run.bundle or 'a bundle'}, and only image "
                        "runs keep checkpoints to resume from; train it again")
    last = store.runs_dir / run.id / CHECKPOINT_DIR / CHECKPOINTS[0]
    if not last.is_file():
        raise DataError(f"run {run.id} has no checkpoint ({last} is missing): it stopped "
                        "before its first epoch ended; train it again")
    store.reopen(run.id, queue=queue)
    if queue:
        start_queued(store.workspace)
    return run.id


def execute_distributed(run_id: str, workspace: str, threads: int, device: str,
                        show_progress: bool, loader_workers: int | None = None) -> None:
    """One rank of a multi-process run (the target of ``distributed.spawn``)."""
    init_process_group(device)
    try:
        bar = None
        if show_progress and rank_and_world()[0] == 0:
            from tqdm import tqdm

            bar = tqdm(total=0, unit="step", file=sys.stderr, leave=False)

        def on_step(step: int, total: int) -> None:
            bar.total = total
            bar.update(step - bar.n)

        try:
            execute_run(run_id, workspace=workspace, threads=threads,
                        on_step=on_step if bar is not None else None,
                        loader_workers=loader_workers)
        except Cancelled:
            pass
        finally:
            if bar is not None:
                bar.close()
    finally:
        shutdown()


def default_max_jobs() -> int:
    """One job per core: each trains on one thread (see :func:`execute_run`)."""
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Work:
    """What queueing some configs means: the ones to train, and why the others are skipped."""

    todo: list[TrainConfig]
    in_flight: int  # identical to a queued or running run
    reused: int  # identical to a finished run


def plan_work(store: RunStore, configs: Sequence[TrainConfig], *, reuse: bool = True) -> Work:
    """Split ``configs`` into the runs to train and the ones that would duplicate a run.

    A config identical to a queued or running run is never trained twice; with ``reuse``, one
    identical to a finished run is skipped too (training is deterministic per seed). Each
    config records its label overrides first (``+lq``), so a changed override is new work.
    """
    for config in configs:
        label_overrides.attach(config, store.workspace)
    flying = {r.config_key for r in store.list(status=["queued", "running"])}
    todo = [c for c in configs if config_key(c.to_dict()) not in flying]
    in_flight = len(configs) - len(todo)
    if reuse:
        todo = [c for c in todo if store.find_done(c.to_dict()) is None]
    return Work(todo, in_flight, len(configs) - in_flight - len(todo))


def queue_runs(configs: Sequence[TrainConfig], *, workspace: str | Path | None = None,
               reuse: bool = True, max_jobs: int | None = None) -> list[str]:
    """Queue the configs that are new work (as :func:`plan_work` tells them, but decided run by
    run in one transaction: :meth:`RunStore.claim`, so two tabs queueing at once never queue a
    run twice) and start what the limit allows; returns the queued run ids, in the order they
    will start: seed-major (every strategy of seed 0, then of seed 1, ...; the given order
    within a seed), so a comparison gains all its strategies early and then more seeds of
    each."""
    store = RunStore(workspace)
    for config in configs:
        label_overrides.attach(config, store.workspace)
    claims = [store.claim(c.to_dict(), queue=True, reuse=reuse)
              for c in sorted(configs, key=lambda c: c.seed)]
    start_queued(store.workspace, max_jobs=max_jobs)
    return [run_id for run_id, new in claims if new]


def start_job(config: TrainConfig, *, workspace: str | Path | None = None,
              max_jobs: int | None = None) -> str:
    """Queue one run, identical ones notwithstanding, and start it when a slot is free."""
    store = RunStore(workspace)
    label_overrides.attach(config, store.workspace)
    run_id = store.create(config.to_dict(), queue=True)
    start_queued(store.workspace, max_jobs=max_jobs)
    return run_id


def start_queued(workspace: str | Path | None = None, *, max_jobs: int | None = None
                 ) -> list[str]:
    """Start the oldest queued runs while fewer than ``max_jobs`` run on this host; returns
    the ids started.

    Jobs call this as they end; anyone may call it again (the Train and Overview pages do),
    e.g. after a job was killed before it could start the next.
    """
    store = RunStore(workspace)
    limit = max_jobs or default_max_jobs()
    host = socket.gethostname()
    started: list[str] = []
    with _queue_lock(store.workspace):
        running = sum(r.host == host for r in store.list(status="running"))
        waiting = [r for r in reversed(store.list(status="queued")) if r.pid is None]
        for run in waiting:
            if running + len(started) >= limit:
                break
            if not store.take_queued(run.id):  # cancelled or taken since the list was read
                continue
            try:
                pid = _spawn(store, run.id, limit)
            except BaseException as exc:  # never left claimed by a launcher that lives on
                store.fail(run.id, f"could not start its job process: {exc or type(exc).__name__}")
                raise
            try:
                store.start(run.id, pid=pid)  # the job's own pid, from now on
            except DataError:  # cancelled meanwhile: the job sees it and ends
                continue
            started.append(run.id)
    return started


@contextlib.contextmanager
def _queue_lock(workspace: Path) -> Iterator[None]:
    """One launcher at a time per workspace (released by the OS if its holder dies)."""
    with (workspace / LOCK_FILE).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _spawn(store: RunStore, run_id: str, max_jobs: int) -> int:
    """A detached job process for one claimed run (its own session, so it outlives the app
    and the browser tab); its output goes to the run's ``job.log``. Returns its pid."""
    with (store.artifact_dir(run_id) / LOG_FILE).open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kdcore", "job", run_id, "--workspace", str(store.workspace),
             "--max-jobs", str(max_jobs)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return proc.pid


def run_job(run_id: str, *, workspace: str | Path | None = None,
            max_jobs: int | None = None) -> int:
    """The body of a job process: train the run, then the next queued ones in this same
    process while the queue has any, then start more jobs for free slots. Returns the exit
    status of the last run (a failed run's error is in the store and in its job.log).

    Taking the next run here instead of spawning a process for it saves a job's start-up
    (Python, torch, scipy: several seconds each on a busy machine) for every run but the
    first: the demo's 25 runs pay it twice on two cores instead of 25 times. Training is
    seeded per run, so a run trains the same in a fresh process and in a reused one.
    """
    status = 0
    current: str | None = run_id
    try:
        while current is not None:
            status = _train_one(current, workspace)
            current = _take_next(workspace, max_jobs)
            if current is not None:
                _log_to(RunStore(workspace).artifact_dir(current) / LOG_FILE)
    finally:
        start_queued(workspace, max_jobs=max_jobs)
    return status


def _train_one(run_id: str, workspace: str | Path | None) -> int:
    try:
        execute_run(run_id, workspace=workspace)
    except Cancelled:
        return 0
    except KDCoreError as exc:
        return report_error(exc)
    return 0


def _take_next(workspace: str | Path | None, max_jobs: int | None) -> str | None:
    """Claim the oldest queued run for this process, unless more jobs than ``max_jobs``
    already run on this host without it; its id, or None."""
    store = RunStore(workspace)
    limit = max_jobs or default_max_jobs()
    host = socket.gethostname()
    with _queue_lock(store.workspace):
        others = sum(r.host == host and r.pid != os.getpid()
                     for r in store.list(status="running"))
        if others >= limit:
            return None
        for run in reversed(store.list(status="queued")):
            if run.pid is not None or not store.take_queued(run.id):
                continue
            try:
                store.start(run.id)  # this process's pid: reaped as interrupted if it dies
            except DataError:  # cancelled meanwhile
                continue
            return run.id
    return None


def _log_to(path: Path) -> None:
    """Send this process's output (stdout and stderr) to ``path`` from now on: each run's
    output stays in its own job.log."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def cancel_job(run_id: str, *, workspace: str | Path | None = None) -> str:
    """Ask a queued or running job to stop; a queued run that never started is cancelled now."""
    store = RunStore(workspace)
    run_id = store.request_cancel(run_id)
    if store.get(run_id).status == "queued":
        store.mark_cancelled(run_id)
    return run_id
