"""Which runs belong together, and which one is "the student": one definition for the dashboard's
pages, the CLI (``kdcore roi``, ``kdcore report``) and the report.

- comparable runs (:func:`comparable_groups`): finished runs trained with identical settings
  apart from the strategy and the seed, one comparison each;
- the comparison shown first (:func:`headline`): on a bundle, the one holding the demo's runs,
  else the largest;
- the best student (:func:`best_student`): in one comparison, the decision's best strategy
  (:func:`kdcore.analysis.decision.decide`, ce included): ce when training on labels alone
  beats the best distiller, that distiller when it beats ce (Holm-adjusted for picking the
  best of N), else the highest mean test accuracy over seeds (more seeds break a tie). So when
  ce wins, the Overview, ROI and the report show and price the ce student. Its run to measure
  is the seed closest to that mean (:func:`closest_to_mean`);
- pending runs (:func:`pending`): queued or running;
- the demo's runs (:func:`demo_runs`): what ``kdcore demo`` trains.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from kdcore.analysis.decision import decide
from kdcore.data.bundles import load_bundle, sample_bundle_path
from kdcore.errors import KDCoreError
from kdcore.learning.strategies import (
    DEFAULT_STRATEGIES,
    parse_strategy,
    strategy_order,
)
from kdcore.learning.train import TrainConfig
from kdcore.store.runs import Run, config_key

PENDING = ("queued", "running")
DEMO_SEEDS = 5

# Config fields that vary inside one comparison; every other field must match.
_VARYING = ("strategy", "seed", "normalisation", "device")
# Settings named in a comparison's label, in this order (others are named when they differ).
_SHOWN = {"epochs": "{} epochs", "temperature": "T={:g}", "lam": "λ={:g}", "lr": "lr={:g}"}


def pending(runs: Sequence[Run]) -> list[Run]:
    """The runs still to finish: queued or running."""
    return [r for r in runs if r.status in PENDING]


def eta_seconds(runs: Sequence[Run], parallel: int) -> float | None:
    """Seconds until the queued and running runs among ``runs`` are done, so a presenter knows
    how long to wait. Two estimates, the larger wins:

    - durations: a run takes the finished runs' mean duration (before any has finished, the
      running ones' pace: elapsed over the share trained), a running one has its untrained
      share left, and the work is spread over ``parallel`` jobs (no more than runs left);
    - throughput: the runs done since the oldest pending run was queued (plus the shares the
      running ones have trained), over the time since then. It also counts what durations
      leave out: each job process's start-up (importing torch) and a machine busy with other
      work.

    None when nothing is pending or there is nothing to go by yet."""
    left = pending(runs)
    if not left:
        return None
    took = [r.duration_s for r in runs if r.status == "done" and r.duration_s]
    if not took:
        took = [r.duration_s / r.fraction for r in left if r.status == "running"
                and r.duration_s and (r.fraction or 0.0) >= 0.05]
    units = sum(1.0 - (r.fraction or 0.0) if r.status == "running" else 1.0 for r in left)
    estimates = []
    if took:
        estimates.append(float(np.mean(took)) * units / max(1, min(parallel, len(left))))
    since = min(_when(r.created_at) for r in left)
    done = sum(r.status == "done" and r.finished_at is not None and _when(r.finished_at) >= since
               for r in runs) + sum(r.fraction or 0.0 for r in left if r.status == "running")
    elapsed = (datetime.now(timezone.utc) - since).total_seconds()
    if done >= 0.5 and elapsed > 0:  # less is too noisy
        estimates.append(units * elapsed / done)
    return max(estimates) if estimates else None


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def on_bundle(runs: Sequence[Run], path: str | Path) -> list[Run]:
    """The runs trained on the dataset at ``path`` (a bundle folder or a tabular file)."""
    target = Path(path).resolve()
    return [r for r in runs if _data_path(r) == target]


def image_folders(runs: Sequence[Run]) -> dict[str, str]:
    """Image folder name -> path, for the folders that runs trained on (``student_arch`` set):
    the data choices of pages that read finished runs, beside the bundles."""
    folders: dict[str, str] = {}
    for run in runs:
        path = _data_path(run)
        if run.config.get("student_arch") and path is not None:
            folders.setdefault(f"{path.name} (image folder)", str(path))
    return folders


def _data_path(run: Run) -> Path | None:
    path = run.config.get("bundle") or run.bundle
    try:
        return Path(path).resolve() if path else None
    except (OSError, ValueError):
        return None


def demo_configs() -> list[TrainConfig]:
    """What ``kdcore demo`` (the Overview's "Run the demo") trains: the default strategies x
    DEMO_SEEDS seeds on the bundled sample with its default settings."""
    sample = load_bundle(None)
    return [TrainConfig.for_bundle(sample, strategy=s, seed=seed)
            for seed in range(DEMO_SEEDS) for s in DEFAULT_STRATEGIES]


def demo_runs(runs: Sequence[Run]) -> list[Run]:
    """The runs of the demo (:func:`demo_configs`) among ``runs``."""
    try:
        keys = {config_key(c.to_dict()) for c in demo_configs()}
    except KDCoreError:
        return []
    return [r for r in runs if (r.config_key or config_key(r.config)) in keys]


# --------------------------------------------------------------------------- comparisons


def _finished(runs: Sequence[Run]) -> list[Run]:
    """Done runs with a test accuracy, oldest first (so the newest of a seed wins)."""
    return sorted((r for r in runs if r.status == "done"
                   and r.metrics.get("test_accuracy") is not None), key=lambda r: r.created_at)


def _normalisation_matters(run: Run) -> bool:
    """Normalisation changes only the bias-aware parts; btkd always uses subset."""
    try:
        return run.strategy != "btkd" and parse_strategy(run.strategy or "").bias_aware
    except KDCoreError:
        return False


def _normalisation(run: Run) -> str | None:
    """The normalisation that tells a run's comparison apart, if its strategy uses one."""
    return run.config.get("normalisation", "batch") if _normalisation_matters(run) else None


def _settings(run: Run) -> tuple:
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in run.config.items()
                        if k not in _VARYING))


def comparable_groups(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """The finished runs (done, with a test accuracy) split into comparisons with identical
    settings, largest first, each keyed by a label naming its settings.

    Runs whose strategy ignores normalisation (ce, kd, dkd, btkd) join every comparison with
    otherwise equal settings, so kd is the baseline of both a batch and a subset comparison.
    Within a comparison the newest run of each (strategy, seed) counts.
    """
    by_settings: dict[tuple, list[Run]] = {}
    for run in _finished(runs):
        by_settings.setdefault(_settings(run), []).append(run)
    groups: list[tuple[str, list[Run]]] = []
    differing = _differing_keys(list(by_settings))
    for settings, members in by_settings.items():
        norms = sorted({_normalisation(r) for r in members} - {None}) or [None]
        for norm in norms:
            chosen = [r for r in members if _normalisation(r) in (None, norm)]
            newest = {(r.strategy, r.seed): r for r in chosen}
            groups.append((_label(dict(settings), differing, norm), list(newest.values())))
    groups.sort(key=lambda item: -len(item[1]))
    return dict(groups)


def _differing_keys(settings: list[tuple]) -> list[str]:
    values: dict[str, set[str]] = {}
    for entry in settings:
        for key, value in entry:
            values.setdefault(key, set()).add(value)
    return sorted(k for k, v in values.items()
                  if len(v) > 1 and k not in _SHOWN and k != "bundle")


def _label(settings: dict[str, str], differing: list[str], norm: str | None) -> str:
    values = {k: json.loads(v) for k, v in settings.items()}
    parts = [Path(str(values.get("bundle", "?"))).name]
    parts += [fmt.format(values[k]) for k, fmt in _SHOWN.items() if k in values]
    parts += [f"{k}={values[k]}" for k in differing if k in values]
    if norm is not None:
        parts.append(f"{norm} normalisation")
    return " · ".join(parts)


def headline(groups: dict[str, list[Run]], path: str | Path | None = None) -> str | None:
    """The key of the comparison to show first among ``groups`` (:func:`comparable_groups`):
    on the dataset at ``path`` (default: the bundled sample), the one holding a finished demo
    run, else the largest; None when none is on that dataset."""
    path = sample_bundle_path() if path is None else path
    on = [key for key, group in groups.items() if on_bundle(group[:1], path)]
    demo = {r.id for r in demo_runs([r for key in on for r in groups[key]])}
    return next((key for key in on if any(r.id in demo for r in groups[key])),  # largest first
                on[0] if on else None)


def recipe(runs: Sequence[Run], run: Run) -> list[Run]:
    """``run`` and the other seeds of its strategy in its comparison (the newest finished run
    per seed), by seed; ``run`` stands for its own seed."""
    same = {r.seed: r for r in _finished(runs) if r.strategy == run.strategy
            and _settings(r) == _settings(run) and _normalisation(r) == _normalisation(run)}
    same[run.seed] = run
    return [same[s] for s in sorted(same, key=lambda s: (s is None, s or 0))]


# --------------------------------------------------------------------------- the student


def by_strategy(group: Sequence[Run]) -> dict[str, list[Run]]:
    """A comparison's runs per strategy, strategies in reading order, runs by seed."""
    out: dict[str, list[Run]] = {}
    for run in sorted(group, key=lambda r: (r.seed is None, r.seed or 0)):
        out.setdefault(run.strategy, []).append(run)
    return {name: out[name] for name in strategy_order(list(out))}


def mean_accuracy(runs: Sequence[Run]) -> float:
    """Mean last-epoch test accuracy over the runs (the seeds of one strategy)."""
    return float(np.mean([float(r.metrics["test_accuracy"]) for r in runs]))


def best_student(group: Sequence[Run]) -> str | None:
    """The strategy that is "the student" of a comparison: ``decision.best_strategy`` (see the
    module's docstring), the same answer as ``compare``'s verdict; None for an empty one."""
    strategies = by_strategy(group)
    accuracies = {name: {r.seed: float(r.metrics["test_accuracy"]) for r in runs}
                  for name, runs in strategies.items()}
    teacher = next((r.metrics.get("teacher_test_accuracy") for r in group), None)
    return decide(accuracies, teacher)["best_strategy"]


def closest_to_mean(runs: Sequence[Run]) -> Run:
    """Of one strategy's seeds, the run whose accuracy is closest to their mean: the one to
    measure as the student."""
    mean = mean_accuracy(runs)
    return min(runs, key=lambda r: abs(float(r.metrics["test_accuracy"]) - mean))
