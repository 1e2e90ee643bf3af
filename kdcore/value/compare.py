"""Compare strategies over seeds, honestly: means, spreads, paired differences with intervals.

Runs are planned from a bundle or tabular file (:func:`plan`) or from an image folder
(:func:`plan_images`). Runs already finished with an identical config are reused from the
store, and identical ones in flight are waited for; the rest are trained in parallel worker
processes of this one (``compare``, the CLI; they die with it), or queued as background jobs
(``start_demo``, the dashboard).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

import numpy as np

from kdcore.analysis.bias import softmax
from kdcore.analysis.calibration import calibration, reliability
from kdcore.analysis.decision import CE, best_of, decide, hurts_and_fixes, per_class_deltas
from kdcore.analysis.metrics import error_map, paired_difference, per_class_accuracy
from kdcore.data.bundles import Bundle
from kdcore.errors import KDCoreError
from kdcore.learning.distributed import exit_with_parent
from kdcore.learning.strategies import is_bias_aware
from kdcore.learning.train import TrainConfig
from kdcore.store import overrides as label_overrides
from kdcore.store.jobs import execute_run, queue_runs
from kdcore.store.runs import Run, RunStore
from kdcore.store.selection import demo_configs
from kdcore.value.predictions import load_test_predictions

BASELINE = "kd"
POLL_S = 0.5  # how often run_all looks at the runs another command trains for it


def plan(bundle: Bundle, strategies: Sequence[str], seeds: Sequence[int],
         **overrides) -> list[TrainConfig]:
    """One config per (strategy, seed), from the bundle's defaults and the overrides."""
    return [TrainConfig.for_bundle(bundle, strategy=s, seed=seed, **overrides)
            for s in strategies for seed in seeds]


def plan_images(images: str | Path, strategies: Sequence[str], seeds: Sequence[int],
                **overrides) -> list[TrainConfig]:
    """One image run per (strategy, seed), from the preset and the overrides (the student, the
    teacher, ...; see :meth:`TrainConfig.for_images`). Each strategy is checked once (the
    folder, the student, the teacher on an image), its other seeds are copies of that config."""
    configs = []
    for strategy in strategies:
        checked = None
        for seed in seeds:
            if checked is None:
                checked = TrainConfig.for_images(images, strategy=strategy, seed=seed, **overrides)
            configs.append(replace(checked, seed=seed))
    return configs


def run_all(store: RunStore, configs: Sequence[TrainConfig], *, workers: int = 2,
            on_done: Callable[[Run, bool], None] | None = None) -> list[Run]:
    """Reuse finished identical runs, wait for identical ones in flight, train the rest; return
    one finished run per config.

    Each config is claimed in one transaction (:meth:`RunStore.claim`), so two identical
    ``compare`` commands at once train every run once: the second waits for the first's runs,
    and trains a run itself if the first ends without finishing it (killed, cancelled).
    ``on_done(run, reused)`` is called as each run becomes available. A failed run raises.
    Each config's ``loader_workers`` (not stored with the run) goes to its training process.
    """
    for config in configs:  # every override read (and any error) before a run is created
        label_overrides.attach(config, store.workspace)
    runs: dict[int, Run] = {}
    training: dict[Future, tuple[int, str]] = {}
    waiting: dict[int, str] = {}
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(configs))),
                             mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker,
                             initargs=(os.getpid(),)) as pool:  # workers start on demand

        def claim(i: int) -> None:
            run_id, mine = store.claim(configs[i].to_dict())
            if mine:
                training[pool.submit(execute_run, run_id, workspace=store.workspace,
                                     loader_workers=configs[i].loader_workers)] = (i, run_id)
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


def _start_worker(parent_pid: int) -> None:
    """A pool worker ends with the command (:func:`exit_with_parent`) and starts its own
    processes (an image run's loader workers) the platform's default way, not by spawn as it
    was started: a spawned loader worker would import torch and kdcore again, seconds each."""
    exit_with_parent(parent_pid)
    multiprocessing.set_start_method(None, force=True)


def summarise(runs: Sequence[Run], store: RunStore | None = None) -> dict:
    """The comparison document (the JSON of ``kdcore compare``) from finished runs.

    From the runs' metrics: per strategy the accuracy over seeds, ``delta_vs_kd``,
    ``delta_vs_ce`` and ``delta_vs_teacher`` (paired 95% intervals), ``excess_inheritance``
    (its share of the teacher's errors minus ce's, the share a student copies without seeing
    the teacher), ``per_class`` (BH-corrected across classes); top level the ``decision``
    (:func:`kdcore.analysis.decision.decide`) and the ``classes`` distillation hurts and fixes.
    From the saved test predictions (``store`` given): ``error_map`` per strategy,
    ``calibration`` and ``reliability``, and per class the comparison with the teacher; these
    are None without a store or when a run's predictions cannot be read (``notes`` says so).
    """
    by_strategy: dict[str, dict[int, Run]] = {}
    for run in runs:
        by_strategy.setdefault(run.strategy, {})[run.seed] = run
    teacher = next(iter(runs)).metrics["teacher_test_accuracy"] if runs else None
    out: dict = {"teacher_test_accuracy": teacher, "strategies": {}}
    accuracy = {name: {s: float(r.metrics["test_accuracy"]) for s, r in seeded.items()}
                for name, seeded in by_strategy.items()}
    decision = decide(accuracy, teacher)
    decision["bias_aware_vs_kd"] = best_of(
        accuracy, [n for n in by_strategy if is_bias_aware(n)], BASELINE)
    notes = [decision["note"]] if decision["note"] else []
    read = _read_artifacts(store, by_strategy, notes)
    classes = {name: {s: r.metrics.get("per_class_accuracy") or {} for s, r in seeded.items()}
               for name, seeded in by_strategy.items()}
    inherit_ce = (_nanmean([r.metrics["bias_inheritance"] for r in by_strategy[CE].values()])
                  if CE in by_strategy else None)
    for name, seeded in by_strategy.items():
        seeds = sorted(seeded)
        acc = np.array([seeded[s].metrics["test_accuracy"] for s in seeds])
        best = np.array([seeded[s].metrics["best_test_accuracy"] for s in seeds])
        inherit = _nanmean([seeded[s].metrics["bias_inheritance"] for s in seeds])
        entry = {
            "mean": float(acc.mean()),
            "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "seeds": seeds,
            "per_seed": [float(a) for a in acc],
            "best_epoch_mean": float(best.mean()),
            "bias_inheritance": inherit,
            "student_params": seeded[seeds[0]].metrics.get("student_params"),
            "run_ids": [seeded[s].id for s in seeds],
            "delta_vs_kd": _paired(accuracy, name, BASELINE),
            "delta_vs_ce": _paired(accuracy, name, CE),
            "delta_vs_teacher": (paired_difference(acc, np.full(len(acc), float(teacher)))
                                 if teacher is not None else None),
            "excess_inheritance": (inherit - inherit_ce if inherit is not None
                                   and inherit_ce is not None else None),
            "per_class": _per_class(classes, name, read["teacher_classes"]),
            "error_map": read["error_map"].get(name),
            "error_map_per_seed": read["error_map_per_seed"].get(name),
        }
        out["strategies"][name] = entry
    out["decision"] = decision
    out["calibration"] = ({"teacher": read["teacher_calibration"],
                           "strategies": read["calibration"]}
                          if read["teacher_calibration"] else None)
    out["reliability"] = read["reliability"]
    out["classes"] = _classes(classes, decision, by_strategy)
    out["notes"] = notes
    out["verdict"] = verdict(out)
    return out


def _paired(accuracy: dict[str, dict[int, float]], name: str, against: str) -> dict | None:
    """``name`` minus ``against`` over their common seeds, 95% interval; None without any."""
    if against not in accuracy:
        return None
    mine, base = accuracy[name], accuracy[against]
    common = [s for s in sorted(mine) if s in base]
    if not common:
        return None
    return paired_difference([mine[s] for s in common], [base[s] for s in common])


def _per_class(classes: dict[str, dict[int, dict]], name: str,
               teacher: dict[str, float | None] | None) -> list[dict]:
    """One row per class: ``name`` against kd, ce and the teacher, each BH-corrected across
    classes (:func:`kdcore.analysis.decision.per_class_deltas`)."""
    mine = classes[name]
    against = {"kd": per_class_deltas(mine, classes[BASELINE]) if BASELINE in classes else {},
               "ce": per_class_deltas(mine, classes[CE]) if CE in classes else {},
               "teacher": per_class_deltas(mine, teacher) if teacher else {}}
    names: list[str] = []
    for row in mine.values():
        names += [c for c in row if c not in names]
    rows = []
    for cls in names:
        row: dict = {"class": cls}
        for key, deltas in against.items():
            found = deltas.get(cls) or {}
            row[f"delta_vs_{key}"] = found.get("delta")
            row[f"p_adjusted_vs_{key}"] = found.get("p_adjusted")
        rows.append(row)
    return rows


def _classes(classes: dict[str, dict[int, dict]], decision: dict,
             by_strategy: dict[str, dict[int, Run]]) -> dict:
    """The classes distillation hurts and fixes: the best distiller against ce (or, without
    ce, the best strategy against kd), BH-corrected, worst and best first, 10 at most."""
    if CE in by_strategy:
        subject, against = decision["best_distilled"], CE
    else:
        subject, against = decision["best_strategy"], BASELINE
    if subject is None or against not in by_strategy or subject == against:
        return {"strategy": subject, "against": None, "hurts": [], "fixes": []}
    found = hurts_and_fixes(per_class_deltas(classes[subject], classes[against]), against)
    return {"strategy": subject, "against": against, **found}


def _read_artifacts(store: RunStore | None, by_strategy: dict[str, dict[int, Run]],
                    notes: list[str]) -> dict:
    """What needs the saved test predictions: calibration (mean over seeds), reliability and
    error-map counts (pooled over seeds), the teacher's calibration and per-class accuracy. A
    strategy with an unreadable seed gets None rather than numbers from fewer seeds."""
    out: dict = {"teacher_calibration": None, "teacher_classes": None, "calibration": {},
                 "reliability": None, "error_map": {}, "error_map_per_seed": {}}
    if store is None:
        notes.append("without the run store, calibration, the error map and the per-class "
                     "comparison with the teacher are left out")
        return out
    problems: list[str] = []
    teacher_probs = labels = None
    pooled: dict[str, dict] = {}
    for name, seeded in by_strategy.items():
        scores, counts, diagrams = [], {}, []
        for seed in sorted(seeded):
            try:
                preds = load_test_predictions(store, seeded[seed])
            except KDCoreError as exc:
                problems.append(str(exc))
                break
            if teacher_probs is None:
                teacher_probs, labels = softmax(preds.teacher_logits), preds.labels
                out["teacher_classes"] = per_class_accuracy(
                    teacher_probs.argmax(1), labels, preds.class_names)
            p = softmax(preds.logits)
            scores.append(calibration(p, preds.labels))
            masks = error_map(p.argmax(1), preds.teacher_logits.argmax(1), preds.labels)
            counts[str(seed)] = {k: int(m.sum()) for k, m in masks.items()}
            diagrams.append(reliability(p, preds.labels))
        else:
            out["calibration"][name] = {k: float(np.mean([s[k] for s in scores]))
                                        for k in ("ece", "nll", "brier")}
            out["error_map"][name] = {k: sum(c[k] for c in counts.values())
                                      for k in ("both_wrong", "fixed", "newly_wrong")}
            out["error_map_per_seed"][name] = counts
            pooled[name] = _pool(diagrams)
    if teacher_probs is not None:
        out["teacher_calibration"] = calibration(teacher_probs, labels)
        out["reliability"] = {"teacher": reliability(teacher_probs, labels),
                              "strategies": pooled}
    for name in by_strategy:
        out["calibration"].setdefault(name, None)
    if problems:
        notes.append(f"the saved test predictions of {len(problems)} run(s) cannot be read, so "
                     f"their strategy has no calibration or error map (first: {problems[0]})")
    return out


def _pool(diagrams: list[dict]) -> dict:
    """Reliability tables of several seeds as one (counts summed, confidence and accuracy
    weighted by count), without holding every seed's probabilities at once."""
    count = np.sum([d["count"] for d in diagrams], axis=0)

    def weighted(key: str) -> list[float | None]:
        total = np.sum([[(v or 0.0) * k for v, k in zip(d[key], d["count"], strict=True)]
                        for d in diagrams], axis=0)
        return [float(t / k) if k else None for t, k in zip(total, count, strict=True)]

    return {"bin_lower": diagrams[0]["bin_lower"], "bin_upper": diagrams[0]["bin_upper"],
            "confidence": weighted("confidence"), "accuracy": weighted("accuracy"),
            "count": [int(k) for k in count]}


def _nanmean(values: Sequence[float | None]) -> float | None:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(clean)) if clean else None


def _pts(x: float) -> str:
    return f"{x * 100:+.1f}"


def _share(x: float) -> str:
    return f"{x:.1%}"


def _interval(delta: dict, n_seeds: int, best_of_n: int | None = None) -> str:
    """" (95% interval ... over n seeds[, Holm-adjusted for the best of N])", or "" without an
    interval."""
    ci = delta["ci95"]
    if ci is None:
        return ""
    holm = f", Holm-adjusted for the best of {best_of_n}" if best_of_n else ""
    seeds = f"{n_seeds} seed" + ("s" if n_seeds != 1 else "")
    return f" (95% interval {_pts(ci[0])} to {_pts(ci[1])} points over {seeds}{holm})"


def _no_interval(n_seeds: int) -> str:
    return ("on one seed, too few to tell; run more seeds" if n_seeds < 2 else
            "by the same amount on every seed (zero variance), so there is no interval; run more "
            "seeds")


def _first_sentence(decision: dict) -> str:
    """Question 1: does any distillation beat training on labels alone (ce)?"""
    if decision["delta_vs_ce"] is None:
        return f"Cannot tell: {decision['note']}."
    name, delta, n = decision["best_distilled"], decision["delta_vs_ce"], decision["n_seeds"]
    where = _interval(delta, n, decision["n_variants"])
    if decision["distil"] is True:
        return (f"Distil: the best distiller, {name}, beats training on labels alone (ce) by "
                f"{_pts(delta['mean'])} points{where}.")
    if decision["distil"] is False:
        return (f"Do not distil: training on labels alone (ce) beats even the best distiller, "
                f"{name}, which is {_pts(delta['mean'])} points against it{where}.")
    if delta["ci95"] is None:
        return (f"Cannot tell: the best distiller, {name}, differs from training on labels "
                f"alone (ce) by {_pts(delta['mean'])} points {_no_interval(n)}.")
    ci = delta["ci95"]
    why = ("an interval that includes 0" if ci[0] <= 0 <= ci[1] else
           f"not significant after Holm's correction (adjusted p = {decision['p_adjusted']:.2f})")
    return (f"Cannot tell: the best distiller, {name}, is {_pts(delta['mean'])} points against "
            f"training on labels alone (ce){where}, {why}.")


def _against_kd(found: dict | None) -> str:
    """Question 2's second half: the best bias-aware variant against vanilla KD, Holm-adjusted
    over the bias-aware variants tried."""
    if not found or found["delta"] is None:
        return ""
    name, delta, n = found["best"], found["delta"], found["n_seeds"]
    where = _interval(delta, n, found["n_variants"])
    if delta["ci95"] is None:
        return (f" Of the bias-aware variants, {name} differs from vanilla KD by "
                f"{_pts(delta['mean'])} points {_no_interval(n)}.")
    if found["wins"] is True:
        return (f" Of the bias-aware variants, {name} beats vanilla KD by "
                f"{_pts(delta['mean'])} points{where}.")
    if found["wins"] is False:
        return (f" Bias-aware distillation does not pay against vanilla KD: its best, {name}, "
                f"is {_pts(delta['mean'])} points against it{where}.")
    return (f" Of the bias-aware variants, {name} cannot be told apart from vanilla KD: "
            f"{_pts(delta['mean'])} points{where}.")


def _teacher_sentence(best: str, decision: dict, n_seeds: int) -> str:
    """Question 3: does the best student beat its teacher?"""
    delta = decision["delta_vs_teacher"]
    if delta is None:
        return ""
    where = _interval(delta, n_seeds)
    if delta["ci95"] is None:
        return (f" Against its teacher, {best} is {_pts(delta['mean'])} points "
                f"{_no_interval(n_seeds)}.")
    if decision["beats_teacher"] is True:
        return f" {best} beats its teacher by {_pts(delta['mean'])} points{where}."
    if decision["beats_teacher"] is False:
        return f" {best} stays below its teacher: {_pts(delta['mean'])} points{where}."
    return (f" {best} cannot be told apart from its teacher: {_pts(delta['mean'])} "
            f"points{where}.")


def _inheritance_sentence(best: str, strategies: dict, decision: dict) -> str:
    """The share of the teacher's test errors copied, beside ce's floor (what a student
    shares with the teacher without seeing it, because those samples are hard)."""
    ce = strategies.get(CE, {}).get("bias_inheritance")
    kd = strategies.get(BASELINE, {}).get("bias_inheritance")
    if best == CE:
        best = decision.get("best_distilled") or best
    share = strategies[best]["bias_inheritance"]
    if share is None:
        return ""
    if ce is None:
        return (f" {best} copies {_share(share)} of the teacher's test errors; without ce "
                "there is no floor, so its excess inheritance is unknown.")
    if best == CE:
        return (f" ce, which never sees the teacher, repeats {_share(ce)} of the teacher's test "
                "errors: the floor of inheritance here.")
    text = (f" {best} copies {_share(share)} of the teacher's test errors against ce's floor of "
            f"{_share(ce)} (ce never sees the teacher): an excess inheritance of "
            f"{_share(share - ce)}")
    if kd is not None and best != BASELINE:
        text += f", against vanilla KD's {_share(kd - ce)}"
    return text + "."


def _classes_sentence(classes: dict | None) -> str:
    """The classes that got significantly worse or better (BH across classes)."""
    if not classes or not classes.get("against") or not (classes["hurts"] or classes["fixes"]):
        return ""

    def named(items: list[dict]) -> str:
        shown = ", ".join(f"{i['class']}: {_pts(i['delta']['mean'])}" for i in items[:3])
        return f"{shown}{', ...' if len(items) > 3 else ''} points"

    def count(n: int) -> str:
        return f"{n} class" + ("es" if n != 1 else "")

    parts = [f"{word} on {count(len(items))} ({named(items)})"
             for word, items in (("worse", classes["hurts"]), ("better", classes["fixes"]))
             if items]
    return (f" Per class, against {classes['against']} (Benjamini-Hochberg across classes), "
            f"{classes['strategy']} is significantly {' and '.join(parts)}.")


def verdict(summary: dict) -> str:
    """Sentences computed from the numbers, in the order a user asks: distil at all (the
    first sentence opens with ``Distil:``, ``Do not distil:`` or ``Cannot tell:``), which
    strategy (and the best bias-aware one against vanilla KD), the teacher, inheritance above
    ce's floor, and the classes that got significantly worse or better."""
    strategies, decision = summary["strategies"], summary["decision"]
    best = decision["best_strategy"]
    if best is None:
        return "Cannot tell: no finished run to compare."
    text = _first_sentence(decision)
    how = {True: "", False: " (training on labels alone)"}.get(
        decision["distil"], " by mean accuracy only, not by a significant margin")
    text += f" The best strategy here is {best}{how}."
    text += _against_kd(decision.get("bias_aware_vs_kd"))
    text += _teacher_sentence(best, decision, len(strategies[best]["seeds"]))
    text += _inheritance_sentence(best, strategies, decision)
    text += _classes_sentence(summary.get("classes"))
    return text


def compare(data: Bundle | str | Path, store: RunStore, strategies: Sequence[str],
            seeds: Sequence[int], *, workers: int = 2,
            on_done: Callable[[Run, bool], None] | None = None, **overrides) -> dict:
    """Plan, run what is missing, and summarise. ``data`` is a loaded bundle or tabular file,
    or with a ``student_arch`` among the overrides an image folder (:func:`plan_images`)."""
    configs = (plan_images(data, strategies, seeds, **overrides)
               if overrides.get("student_arch") else plan(data, strategies, seeds, **overrides))
    return summarise(run_all(store, configs, workers=workers, on_done=on_done), store)


def start_demo(workspace: str | Path | None = None, *, max_jobs: int | None = None) -> list[str]:
    """Queue the demo (the default strategies x DEMO_SEEDS seeds on the bundled sample) as
    background jobs, like any run started from the app; returns the ids queued (none for
    runs already finished or in flight)."""
    return queue_runs(demo_configs(), workspace=workspace, max_jobs=max_jobs)
