"""Start, run and cancel training jobs. Each job is its own process that writes to the store.

The app and the CLI call ``start_job`` (a detached ``python -m kdcore.store.jobs RUN_ID`` process,
which outlives the browser tab and the app) or ``execute_run`` in the current process; either
way progress, per-epoch metrics and the final result go to the run store, so any reader sees
them. ``cancel_job`` asks the process to stop; it checks between batches.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from kdcore.data.bundles import load_dataset
from kdcore.errors import KDCoreError
from kdcore.errors import report as report_error
from kdcore.learning.allocator import keep_freed_memory
from kdcore.learning.distributed import init_process_group, rank_and_world, shutdown
from kdcore.learning.train import Cancelled, TrainConfig, save_artifacts, train_student
from kdcore.store import overrides as label_overrides
from kdcore.store.runs import RunStore

LOG_FILE = "job.log"


def execute_run(run_id: str, *, workspace: str | Path | None = None, threads: int = 1,
                on_step: Callable[[int, int], None] | None = None) -> dict:
    """Train a queued run in this process and record everything; returns its final metrics.

    One thread per run: the bundled models are small, and several runs in parallel processes
    use the cores better than one run on many threads. Under torch.distributed every rank
    calls this; only rank 0 writes to the store.
    """
    torch.set_num_threads(threads)
    keep_freed_memory()  # no page faults for the same tensors every step (learning.allocator)
    lead = rank_and_world()[0] == 0
    store = RunStore(workspace)
    run = store.get(run_id)
    config = TrainConfig(**run.config)
    if lead:
        store.start(run.id)

    def on_progress(step: int, total: int, metrics: dict | None) -> None:
        if metrics is None:
            store.progress(run.id, step=step, total_steps=total)
        else:
            store.log_epoch(run.id, metrics["epoch"], metrics)
            store.progress(run.id, step=step, total_steps=total,
                           message=f"epoch {metrics['epoch'] + 1}/{config.epochs}")
        if on_step is not None:
            on_step(step, total)

    try:
        bundle = load_dataset(config.bundle, **config.data_options)
        model, result, metrics = train_student(
            config, bundle, on_progress=on_progress if lead else None,
            should_cancel=(lambda: store.cancel_requested(run.id)) if lead else None)
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


def execute_distributed(run_id: str, workspace: str, threads: int, device: str,
                        show_progress: bool) -> None:
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
                        on_step=on_step if bar is not None else None)
        except Cancelled:
            pass
        finally:
            if bar is not None:
                bar.close()
    finally:
        shutdown()


def start_job(config: TrainConfig, *, workspace: str | Path | None = None) -> str:
    """Queue a run and train it in a detached process; returns the run id at once."""
    store = RunStore(workspace)
    label_overrides.attach(config, store.workspace)
    run_id = store.create(config.to_dict())
    log = (store.artifact_dir(run_id) / LOG_FILE).open("ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.Popen(
        [sys.executable, "-m", "kdcore.store.jobs", run_id, "--workspace", str(store.workspace)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, env=env,
    )
    log.close()
    return run_id


def cancel_job(run_id: str, *, workspace: str | Path | None = None) -> str:
    """Ask a queued or running job to stop; a queued run that never started is cancelled now."""
    store = RunStore(workspace)
    run_id = store.request_cancel(run_id)
    if store.get(run_id).status == "queued":
        store.mark_cancelled(run_id)
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdcore.store.jobs",
                                     description="Train one queued run (used by start_job).")
    parser.add_argument("run_id")
    parser.add_argument("--workspace")
    args = parser.parse_args(argv)
    try:
        execute_run(args.run_id, workspace=args.workspace)
    except Cancelled:
        return 0
    except KDCoreError as exc:
        return report_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
