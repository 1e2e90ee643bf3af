"""Compare strategies over seeds, honestly: means, spreads, paired differences with intervals.

Runs already finished with an identical config are reused from the store, and identical ones
in flight are waited for; the rest are trained in parallel worker processes of this one
(``compare``, the CLI; they die with it), or queued as background jobs (``start_demo``, the
dashboard).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from kdcore.analysis.metrics import paired_difference
from kdcore.data.bundles import Bundle
from kdcore.errors import KDCoreError
from kdcore.learning.distributed import exit_with_parent
from kdcore.learning.strategies import is_bias_aware
from kdcore.learning.train import TrainConfig
from kdcore.store import overrides as label_overrides
from kdcore.store.jobs import execute_run, queue_runs
from kdcore.store.runs import Run, RunStore
from kdcore.store.selection import demo_configs

BASELINE = "kd"
POLL_S = 0.5  # how often run_all looks at the runs another command trains for it


def plan(bundle: Bundle, strategies: Sequence[str], seeds: Sequence[int],
         **overrides) -> list[TrainConfig]:
    """One config per (strategy, seed), from the bundle's defaults and the overrides."""
    return [TrainConfig.for_bundle(bundle, strategy=s, seed=seed, **overrides)
            for s in strategies for seed in seeds]


def run_all(store: RunStore, configs: Sequence[TrainConfig], *, workers: int = 2,
            on_done: Callable[[Run, bool], None] | None = None) -> list[Run]:
    """Reuse finished identical runs, wait for identical ones in flight, train the rest; return
    one finished run per config.

    Each config is claimed in one transaction (:meth:`RunStore.claim`), so two identical
    ``compare`` commands at once train every run once: the second waits for the first's runs,
    and trains a run itself if the first ends without finishing it (killed, cancelled).
    ``on_done(run, reused)`` is called as each run becomes available. A failed run raises.
    """
    for config in configs:  # every override read (and any error) before a run is created
        label_overrides.attach(config, store.workspace)
    runs: dict[int, Run] = {}
    training: dict[Future, tuple[int, str]] = {}
    waiting: dict[int, str] = {}
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(configs))),
                             mp_context=get_context("spawn"), initializer=exit_with_parent,
                             initargs=(os.getpid(),)) as pool:  # workers start on demand

        def claim(i: int) -> None:
            run_id, mine = store.claim(configs[i].to_dict())
            if mine:
                training[pool.submit(execute_run, run_id, workspace=store.workspace)] = (i, run_id)
            else:
                waiting[i] = run_id

        def available(i: int, run: Run, reused: bool) -> None:
            runs[i] = run
            if on_done:
                on_done(run, reused)

        for i in range(len(configs)):
            claim(i)
        while training or waiting:
            for i, run_id in list(waiting.items()):
                run = store.get(run_id)
                if run.finished:
                    del waiting[i]
                    if run.status == "done":
                        available(i, run, True)
                    else:
                        claim(i)
            finished: set[Future] = set()
            if training:
                finished, _ = wait(training, timeout=POLL_S if waiting else None,
                                   return_when=FIRST_COMPLETED)
            elif waiting:
                time.sleep(POLL_S)
            for future in finished:
                i, run_id = training.pop(future)
                try:
                    future.result()
                except KDCoreError as exc:
                    raise KDCoreError(f"run {run_id} ({configs[i].strategy}, seed "
                                      f"{configs[i].seed}) failed: {exc}") from None
                available(i, store.get(run_id), False)
    return [runs[i] for i in range(len(configs))]


def summarise(runs: Sequence[Run]) -> dict:
    """The comparison document (the JSON of ``kdcore compare``) from finished runs."""
    by_strategy: dict[str, dict[int, Run]] = {}
    for run in runs:
        by_strategy.setdefault(run.strategy, {})[run.seed] = run
    teacher = next(iter(runs)).metrics["teacher_test_accuracy"] if runs else None
    out: dict = {"teacher_test_accuracy": teacher, "strategies": {}}
    baseline = by_strategy.get(BASELINE)
    for name, seeded in by_strategy.items():
        seeds = sorted(seeded)
        acc = np.array([seeded[s].metrics["test_accuracy"] for s in seeds])
        best = np.array([seeded[s].metrics["best_test_accuracy"] for s in seeds])
        inherit = [seeded[s].metrics["bias_inheritance"] for s in seeds]
        entry = {
            "mean": float(acc.mean()),
            "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "seeds": seeds,
            "per_seed": [float(a) for a in acc],
            "best_epoch_mean": float(best.mean()),
            "bias_inheritance": _nanmean(inherit),
            "student_params": seeded[seeds[0]].metrics.get("student_params"),
            "run_ids": [seeded[s].id for s in seeds],
            "delta_vs_kd": None,
        }
        if baseline is not None:
            common = [s for s in seeds if s in baseline]
            if common:
                entry["delta_vs_kd"] = paired_difference(
                    [seeded[s].metrics["test_accuracy"] for s in common],
                    [baseline[s].metrics["test_accuracy"] for s in common])
        out["strategies"][name] = entry
    out["verdict"] = verdict(out)
    return out


def _nanmean(values: Sequence[float | None]) -> float | None:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(clean)) if clean else None


def _pts(x: float) -> str:
    return f"{x * 100:+.1f}"


def verdict(summary: dict) -> str:
    """One sentence, computed from the numbers: does bias-aware distillation pay here?"""
    strategies = summary["strategies"]
    aware = {n: e for n, e in strategies.items()
             if is_bias_aware(n) and e["delta_vs_kd"]}
    if BASELINE not in strategies or not aware:
        return "Add kd and at least one bias-aware strategy (e.g. kd+be+br+dl) to get a verdict."
    name, best = max(aware.items(), key=lambda item: item[1]["mean"])
    delta, n = best["delta_vs_kd"], len(best["seeds"])
    ci = delta["ci95"]
    interval = f" (95% interval {_pts(ci[0])} to {_pts(ci[1])} points over {n} seeds)" if ci else ""
    if ci is None:
        head = (f"{name} is {_pts(delta['mean'])} points against vanilla KD on one seed, too "
                "few to tell; run more seeds")
    elif ci[0] > 0:
        head = f"{name} beats vanilla KD by {_pts(delta['mean'])} points{interval}"
    elif ci[1] < 0:
        head = (f"Bias-aware distillation does not pay here: its best, {name}, loses to "
                f"vanilla KD by {_pts(delta['mean'])} points{interval}")
    else:
        head = (f"No clear difference: the best bias-aware strategy, {name}, is "
                f"{_pts(delta['mean'])} points against vanilla KD{interval}, an interval that "
                "includes 0")
    kd_inherit, inherit = strategies[BASELINE]["bias_inheritance"], best["bias_inheritance"]
    tail = ""
    if kd_inherit is not None and inherit is not None:
        tail = (f"; it copies {inherit:.0%} of the teacher's test errors against KD's "
                f"{kd_inherit:.0%}")
    teacher = summary.get("teacher_test_accuracy")
    if teacher is not None:
        side = "above" if best["mean"] > teacher else "below"
        tail += f", and ends {abs(best['mean'] - teacher) * 100:.1f} points {side} the teacher"
    return head + tail + "."


def compare(bundle: Bundle, store: RunStore, strategies: Sequence[str], seeds: Sequence[int], *,
            workers: int = 2, on_done: Callable[[Run, bool], None] | None = None,
            **overrides) -> dict:
    """Plan, run what is missing, and summarise."""
    configs = plan(bundle, strategies, seeds, **overrides)
    return summarise(run_all(store, configs, workers=workers, on_done=on_done))


def start_demo(workspace: str | Path | None = None, *, max_jobs: int | None = None) -> list[str]:
    """Queue the demo (the default strategies x DEMO_SEEDS seeds on the bundled sample) as
    background jobs, like any run started from the app; returns the ids queued (none for
    runs already finished or in flight)."""
    return queue_runs(demo_configs(), workspace=workspace, max_jobs=max_jobs)
