"""Find the best recipe without training the full grid: successive halving over candidates.

    kdcore recommend [DATA] [--budget-runs N | --budget-minutes M] [--candidates kd kd@T=2 ...]

A candidate is a strategy with option overrides, ``STRATEGY[@KEY=VALUE]...``: ``kd@T=2``,
``kd+be+br+dl@T=8@lam=0.3``, ``dkd@beta=4``. Keys are training settings (``T`` or
``temperature``, ``lam``, ``lr``, ``epochs``, ...) or the base loss's own options (dkd's
``alpha``, ``beta``, ``warmup``; see ``kdcore.learning.losses.METHODS``).

The search (:func:`successive_halving`): round 1 trains every candidate on seeds 0 and 1 (a
paired interval needs two); each later round adds the next seed to the survivors. After each
round the leader (highest mean) is compared with every other survivor over their shared seeds:
paired t-tests, Holm's step-down over those comparisons and each one's interval at the level
Holm uses for its rank, as :mod:`kdcore.analysis.decision` adjusts a winner picked after the
fact. A survivor whose interval lies below zero is dropped. The search stops when the leader is
separated (no other survivor), when every survivor has ``seeds_max`` seeds, or when the budget
is spent; a round the budget cannot pay for in full gives its seeds to the highest means first.

Runs are planned and trained as ``compare`` does (:func:`kdcore.value.compare.run_all`), so
finished identical runs are reused and count as used. The result is kept in the workspace,
``recommendations/<data key>/<search key>.json`` (its progress beside it while it runs), where
the Overview and the report find the latest one for a data source.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from kdcore.analysis.decision import ALPHA, CE, holm, paired_p
from kdcore.analysis.metrics import paired_difference
from kdcore.data import Dataset
from kdcore.errors import DataError
from kdcore.learning.losses import METHODS
from kdcore.learning.strategies import BTKD, parse_strategy
from kdcore.learning.train import TrainConfig, check_options
from kdcore.store.runs import Run, RunStore, config_key
from kdcore.store.tasks import TASKS_DIR, Task, start_task, task_key
from kdcore.value.compare import BASELINE, run_all
from kdcore.workspace import resolve_workspace

DEFAULT_CANDIDATES = ("ce", "kd", "dkd", "ls", "dist", "rld", "kd+be+br+dl", BTKD,
                      "kd@T=2", "kd@T=8", "kd+be+br+dl@T=2", "kd+be+br+dl@T=8")
SEEDS_MAX = 5
FIRST_SEEDS = 2  # round 1 gives every candidate this many seeds: a paired interval needs two
RECOMMENDATIONS_DIR = "recommendations"
SURVIVED = "survived"
# Training settings a candidate may set (everything else is the base loss's own option), and
# the short names accepted for them.
SETTINGS = ("temperature", "lam", "lr", "epochs", "batch_size", "weight_decay", "normalisation",
            "optimizer", "lr_schedule")
ALIASES = {"t": "temperature", "lambda": "lam"}
SHOWN_AS = {"temperature": "T"}
SYNTAX = "STRATEGY[@KEY=VALUE]..., e.g. kd@T=2 or kd+be+br+dl@T=8@lam=0.3"
_KEY = re.compile(r"[a-z_][a-z0-9_]*")

Pair = tuple[str, int]  # (candidate label, seed)


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    """A recipe: a strategy and the options it overrides (training settings and the base
    loss's own options), named by ``label`` (``kd@T=2``)."""

    label: str
    strategy: str
    settings: dict = field(default_factory=dict)
    method_options: dict = field(default_factory=dict)

    @property
    def options(self) -> dict:
        return {**self.settings, **self.method_options}


def parse_candidate(text: str) -> Candidate:
    """``STRATEGY[@KEY=VALUE]...`` as a :class:`Candidate`; one-line DataError otherwise."""
    raw = str(text).strip()
    strategy_text, *assignments = raw.split("@")
    try:
        strategy = parse_strategy(strategy_text)
    except DataError as exc:
        raise DataError(f"candidate {raw!r}: {exc}") from None
    name = BTKD if strategy_text.strip().lower() == BTKD else strategy.name
    method = METHODS.get(strategy.base) if strategy.distills else None
    typed = {f.name: type(f.default) for f in fields(method)} if method else {}
    typed.update({f.name: type(f.default) for f in fields(TrainConfig) if f.name in SETTINGS})
    settings: dict = {}
    method_options: dict = {}
    for assignment in assignments:
        key, sep, value = (part.strip() for part in assignment.partition("="))
        key = ALIASES.get(key.lower(), key.lower())
        if not sep or not value or not _KEY.fullmatch(key):
            raise DataError(f"candidate {raw!r}: {assignment!r} is not KEY=VALUE; write "
                            f"{SYNTAX}")
        if key in settings or key in method_options:
            raise DataError(f"candidate {raw!r}: {key} is given twice; give it once")
        target = settings if key in SETTINGS else method_options
        target[key] = _typed(value, typed.get(key, float), raw, key)
    check_options(settings, where=f"candidate {raw!r}: ")
    label = name + "".join(f"@{SHOWN_AS.get(k, k)}={_shown(v)}"
                           for k, v in {**settings, **method_options}.items())
    return Candidate(label, name, settings, method_options)


def _typed(value: str, kind: type, raw: str, key: str) -> object:
    if kind is str:
        return value.lower()
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or (kind is int and not number.is_integer()):
        what = "a whole number" if kind is int else "a number"
        raise DataError(f"candidate {raw!r}: {SHOWN_AS.get(key, key)}={value} needs {what}, "
                        f"e.g. {raw.split('@')[0]}@{SHOWN_AS.get(key, key)}=2")
    return int(number) if kind is int else number


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def parse_candidates(texts: Sequence[str] | str | None) -> list[Candidate]:
    """Candidates from a list of texts, each possibly comma-separated (``ce,kd kd@T=2``);
    the default candidates when none is given."""
    if isinstance(texts, str):
        texts = [texts]
    items = [part.strip() for text in (texts or DEFAULT_CANDIDATES) for part in text.split(",")]
    items = [part for part in items if part]
    if not items:
        raise DataError(f"--candidates is empty; give recipes such as ce kd kd@T=2 ({SYNTAX})")
    return [parse_candidate(item) for item in items]


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Search:
    """A search, planned and checked (:func:`plan_search`): its candidates, budget, settings
    and where its result and progress are kept."""

    data: Dataset
    candidates: tuple[Candidate, ...]
    seeds_max: int
    budget_runs: int | None
    budget_minutes: float | None
    overrides: dict
    workspace: Path
    duplicates: tuple[str, ...] = ()  # labels left out: the same recipe as an earlier one

    @property
    def full_grid_runs(self) -> int:
        return len(self.candidates) * self.seeds_max

    def config(self, candidate: Candidate, seed: int) -> TrainConfig:
        """The run of ``candidate`` on ``seed``: the data's defaults, then the search's
        overrides, then the candidate's own options."""
        try:
            return TrainConfig.for_bundle(
                self.data, strategy=candidate.strategy, seed=seed,
                **{**self.overrides, **candidate.settings},
                method_options=dict(candidate.method_options) or None)
        except DataError as exc:
            raise DataError(f"candidate {candidate.label!r}: {exc}") from None

    @property
    def folder(self) -> Path:
        """Every search on this data keeps its result here."""
        return self.workspace / RECOMMENDATIONS_DIR / data_key(self.data.path,
                                                               self.data.data_options)

    @property
    def key(self) -> str:
        """What makes the search: its candidates, seeds, budget and settings."""
        return _digest([[c.label for c in self.candidates], self.seeds_max, self.budget_runs,
                        self.budget_minutes, self.overrides])

    @property
    def result_path(self) -> Path:
        return self.folder / f"{self.key}.json"

    @property
    def progress_path(self) -> Path:
        return self.folder / f"{self.key}.progress"

    def argv(self) -> list[str]:
        """The ``kdcore recommend`` command line of this search (bundle folders only: a
        tabular file's reading options are not passed)."""
        argv = ["recommend", str(self.data.path), "--workspace", str(self.workspace),
                "--candidates", *[c.label for c in self.candidates],
                "--seeds-max", str(self.seeds_max), "--quiet"]
        if self.budget_minutes is not None:
            argv += ["--budget-minutes", f"{self.budget_minutes:g}"]
        else:
            argv += ["--budget-runs", str(self.budget_runs)]
        for key, value in self.overrides.items():
            flag = f"--{key.replace('_', '-')}"
            argv += [flag] if value is True else [flag, _shown(value)]
        return argv


def plan_search(data: Dataset, candidates: Sequence[str] | str | None = None, *,
                seeds_max: int = SEEDS_MAX, budget_runs: int | None = None,
                budget_minutes: float | None = None, workspace: str | Path | None = None,
                **overrides) -> Search:
    """Parse and check everything before a run is stored: the candidates (each planned once,
    so a bad option is one line now), the budget (default: half the full grid's runs) and
    the seeds. Candidates with identical training settings are one recipe: the first is kept
    and the others are listed in ``duplicates``."""
    if seeds_max < 1:
        raise DataError(f"--seeds-max {seeds_max}: give 1 or more")
    if budget_runs is not None and budget_minutes is not None:
        raise DataError("give one budget, --budget-runs or --budget-minutes, not both")
    if budget_minutes is not None and not (math.isfinite(budget_minutes) and budget_minutes > 0):
        raise DataError(f"--budget-minutes {budget_minutes}: give a number of minutes above 0")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    parsed = parse_candidates(candidates)
    search = Search(data, (), seeds_max, budget_runs, budget_minutes, overrides,
                    resolve_workspace(workspace))
    kept: dict[str, Candidate] = {}  # the store's key of the seed-0 run -> the recipe
    duplicates = []
    for candidate in parsed:
        key = config_key(search.config(candidate, 0).to_dict())
        if key in kept:
            duplicates.append(candidate.label)
        else:
            kept[key] = candidate
    search = replace(search, candidates=tuple(kept.values()), duplicates=tuple(duplicates))
    first = len(search.candidates) * min(FIRST_SEEDS, seeds_max)
    if budget_runs is None and budget_minutes is None:
        budget_runs = max(search.full_grid_runs // 2, first)
    if budget_runs is not None and budget_runs < first:
        raise DataError(f"--budget-runs {budget_runs} cannot give each of the "
                        f"{len(search.candidates)} candidates the {min(FIRST_SEEDS, seeds_max)} "
                        f"seeds a first comparison needs; give at least {first} or fewer "
                        "candidates")
    return replace(search, budget_runs=budget_runs)


def data_key(path: str | Path, data_options: Mapping | None = None) -> str:
    """The folder name of a data source's recommendations: its resolved path (and, for a
    tabular file, how it is read), as runs are found by their data path."""
    return _digest([str(Path(path).resolve()), dict(data_options or {})])


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the search


def holm_intervals(diffs: Mapping[str, Sequence[float]], alpha: float = ALPHA) -> dict[str, dict]:
    """Per name, its paired differences against one reference: ``mean``, ``ci95`` at the level
    Holm's step-down uses for its rank among the N tests, 1 - alpha/(N - rank + 1) (the
    interval excludes 0 exactly when Holm rejects; see :mod:`kdcore.analysis.decision`),
    ``level``, ``n_seeds``, ``p_value`` and ``p_adjusted`` (None where there is none)."""
    names = list(diffs)
    pvalues = [paired_p(diffs[n]) for n in names]
    adjusted = holm(pvalues)
    tested = [q for q in pvalues if not math.isnan(q)]
    out: dict[str, dict] = {}
    for name, p, p_adj in zip(names, pvalues, adjusted, strict=True):
        rank = len(names) if math.isnan(p) else 1 + sum(q < p for q in tested)
        level = 1 - alpha / (len(names) - rank + 1)
        values = list(diffs[name])
        delta = (paired_difference(values, np.zeros(len(values)), level=level) if values
                 else {"mean": None, "ci95": None})
        out[name] = {**delta, "level": level, "n_seeds": len(values),
                     "p_value": None if math.isnan(p) else p,
                     "p_adjusted": None if math.isnan(p_adj) else p_adj}
    return out


def _mean(seeded: Mapping[int, float]) -> float:
    return float(np.mean(list(seeded.values()))) if seeded else -math.inf


def _shared(a: Mapping[int, float], b: Mapping[int, float]) -> list[float]:
    """``a`` minus ``b`` over their shared seeds, by seed."""
    return [a[s] - b[s] for s in sorted(a) if s in b]


def successive_halving(labels: Sequence[str],
                       evaluate: Callable[[list[Pair]], Mapping[Pair, float]], *,
                       seeds_max: int = SEEDS_MAX, budget_runs: int | None = None,
                       budget_seconds: float | None = None,
                       clock: Callable[[], float] = time.monotonic,
                       on_round: Callable[[dict], None] | None = None) -> dict:
    """The search of the module's docstring over ``labels``; ``evaluate(pairs)`` trains (or
    reuses) each (label, seed) and returns its accuracy. With ``budget_seconds``, a round
    after the first gets as many runs as the time left allows at the pace so far.

    Returns ``accuracies`` (label -> seed -> accuracy), ``leader``, ``dropped`` (label ->
    ``round`` and ``vs_leader``, its Holm-level interval then), ``rounds`` (per round
    ``round``, ``seeds``, ``runs``, ``leader``, ``survivors``, ``dropped``), ``runs_used`` and
    ``stopped`` (``separated``, ``seeds_max`` or ``budget``).
    """
    accuracies: dict[str, dict[int, float]] = {label: {} for label in labels}
    survivors = list(labels)
    dropped: dict[str, dict] = {}
    rounds: list[dict] = []
    used, started, stopped = 0, clock(), None

    def ranked() -> list[str]:  # highest mean first, more seeds then the given order break ties
        return sorted(survivors, key=lambda n: (-_mean(accuracies[n]), -len(accuracies[n])))

    while stopped is None:
        seeds = min(seeds_max, FIRST_SEEDS + len(rounds))
        work = [(n, s) for n in ranked() for s in range(seeds) if s not in accuracies[n]]
        allowed = len(work)
        if budget_runs is not None:
            allowed = min(allowed, budget_runs - used)
        if budget_seconds is not None and rounds:
            elapsed = clock() - started
            pace = max(elapsed / max(used, 1), 1e-9)  # seconds per run so far
            allowed = min(allowed, int((budget_seconds - elapsed) / pace))
        if not work:
            stopped = "seeds_max"
            break
        if allowed <= 0:
            stopped = "budget"
            break
        if allowed < len(work):
            work, stopped = work[:allowed], "budget"
        if on_round:
            on_round({"round": len(rounds) + 1, "seeds": seeds, "runs": len(work),
                      "survivors": list(survivors)})
        for (name, seed), accuracy in evaluate(work).items():
            accuracies[name][seed] = float(accuracy)
        used += len(work)
        leader = ranked()[0]
        tests = holm_intervals({n: _shared(accuracies[n], accuracies[leader])
                                for n in survivors if n != leader})
        out = [n for n, t in tests.items() if t["ci95"] is not None and t["ci95"][1] < 0]
        for name in out:
            dropped[name] = {"round": len(rounds) + 1, "vs_leader": tests[name]}
        survivors = [n for n in survivors if n not in out]
        rounds.append({"round": len(rounds) + 1, "seeds": seeds, "runs": len(work),
                       "leader": leader, "survivors": list(survivors), "dropped": out})
        if len(survivors) == 1:
            stopped = "separated"
    return {"accuracies": accuracies, "leader": ranked()[0], "dropped": dropped,
            "rounds": rounds, "runs_used": used, "stopped": stopped}


# --------------------------------------------------------------------------- the command


def recommend(search: Search, store: RunStore, *, workers: int = 2,
              on_run: Callable[[Run, bool, dict], None] | None = None) -> dict:
    """Run ``search`` (training through compare's pool, reusing finished identical runs),
    keep its result in the workspace and return it (the JSON of ``kdcore recommend``).
    ``on_run(run, reused, progress)`` is called as each run becomes available."""
    by_label = {c.label: c for c in search.candidates}
    runs: dict[Pair, Run] = {}
    progress: dict = {"state": "running", "round": 0, "round_runs": 0, "round_done": 0,
                      "runs_used": 0, "runs_reused": 0, "budget_runs": search.budget_runs,
                      "budget_minutes": search.budget_minutes,
                      "full_grid_runs": search.full_grid_runs, "survivors": [],
                      "started": _now()}
    _write_json(search.progress_path, progress)

    def on_round(info: dict) -> None:
        progress.update(round=info["round"], round_runs=info["runs"], round_done=0,
                        survivors=info["survivors"])
        _write_json(search.progress_path, progress)

    def evaluate(pairs: list[Pair]) -> dict[Pair, float]:
        def on_done(run: Run, reused: bool) -> None:
            progress["round_done"] += 1
            progress["runs_used"] += 1
            progress["runs_reused"] += int(reused)
            _write_json(search.progress_path, progress)
            if on_run:
                on_run(run, reused, progress)

        configs = [search.config(by_label[label], seed) for label, seed in pairs]
        finished = run_all(store, configs, workers=workers, on_done=on_done)
        runs.update(zip(pairs, finished, strict=True))
        return {pair: float(run.metrics["test_accuracy"]) for pair, run in zip(
            pairs, finished, strict=True)}

    try:
        found = successive_halving(
            list(by_label), evaluate, seeds_max=search.seeds_max, budget_runs=search.budget_runs,
            budget_seconds=search.budget_minutes * 60 if search.budget_minutes else None,
            on_round=on_round)
    except BaseException:
        search.progress_path.unlink(missing_ok=True)
        raise
    doc = _document(search, found, runs, reused=progress["runs_reused"])
    _write_json(search.result_path, doc)
    search.progress_path.unlink(missing_ok=True)
    return doc


def _document(search: Search, found: dict, runs: Mapping[Pair, Run], *, reused: int) -> dict:
    accuracies, leader = found["accuracies"], found["leader"]
    by_label = {c.label: c for c in search.candidates}
    teacher = next((r.metrics.get("teacher_test_accuracy") for r in runs.values()), None)

    def entry(label: str) -> dict:
        seeded = accuracies[label]
        seeds = sorted(seeded)
        drop = found["dropped"].get(label)
        return {"recipe": label, "strategy": by_label[label].strategy,
                "options": by_label[label].options, "mean": _mean(seeded), "seeds": len(seeds),
                "per_seed": [seeded[s] for s in seeds],
                "round_dropped": drop["round"] if drop else SURVIVED,
                "delta_vs_leader": _claim(drop["vs_leader"], None) if drop else None,
                "run_ids": [runs[(label, s)].id for s in seeds]}

    survived = sorted((n for n in accuracies if n not in found["dropped"]),
                      key=lambda n: (n != leader, -_mean(accuracies[n]), -len(accuracies[n])))
    out_early = sorted(found["dropped"], key=lambda n: (-found["dropped"][n]["round"],
                                                         -_mean(accuracies[n])))
    notes = []
    if search.duplicates:
        notes.append(f"left out as the same recipe as an earlier candidate: "
                     f"{', '.join(search.duplicates)}")
    recommended = entry(leader)
    del recommended["round_dropped"], recommended["delta_vs_leader"]
    for key, baseline in (("delta_vs_kd", BASELINE), ("delta_vs_ce", CE)):
        recommended[key] = None
        if baseline not in accuracies:
            notes.append(f"{baseline} was not a candidate, so there is no {key}")
        elif baseline == leader:
            notes.append(f"the recommended recipe is {baseline} itself, so there is no {key}")
        else:
            others = {n: _shared(accuracies[n], accuracies[baseline]) for n in accuracies
                      if n != baseline}
            recommended[key] = _claim(holm_intervals(others)[leader], len(others))
    doc = {
        "data": search.data.name,
        "data_path": str(Path(search.data.path).resolve()),
        "teacher_test_accuracy": teacher,
        "recommended": recommended,
        "ranking": [entry(n) for n in survived + out_early],
        "runs_used": found["runs_used"],
        "runs_trained": found["runs_used"] - reused,
        "runs_reused": reused,
        "full_grid_runs": search.full_grid_runs,
        "stopped": found["stopped"],
        "rounds": found["rounds"],
        "budget": {"runs": search.budget_runs, "minutes": search.budget_minutes},
        "seeds_max": search.seeds_max,
        "settings": search.overrides,
        "finished_at": _now(),
        "notes": notes,
    }
    doc["summary"] = summary_sentence(doc)
    return doc


def _claim(test: dict, best_of: int | None) -> dict:
    """A Holm-level interval as the JSON gives it."""
    return {"mean": test["mean"], "ci95": test["ci95"], "level": test["level"],
            "n_seeds": test["n_seeds"], "p_adjusted": test["p_adjusted"],
            "adjustment": f"holm, best of {best_of}" if best_of else "holm, against the leader",
            "n_variants": best_of}


_STOPPED = {"separated": "the leader was separated from every other candidate",
            "seeds_max": "every survivor had all its seeds",
            "budget": "the budget was spent"}


def summary_sentence(doc: dict) -> str:
    """One or two sentences from the numbers: the recipe, its claims and the search's cost."""
    rec = doc["recommended"]
    text = (f"Recommended: {rec['recipe']}, {rec['mean'] * 100:.1f}% test accuracy over "
            f"{rec['seeds']} seed{'s' * (rec['seeds'] != 1)}")
    claims = []
    for key, name in (("delta_vs_kd", "kd"), ("delta_vs_ce", "ce")):
        delta = rec.get(key)
        if delta:
            ci = delta["ci95"]
            where = (f" (interval {ci[0] * 100:+.1f} to {ci[1] * 100:+.1f} over "
                     f"{delta['n_seeds']} seeds, Holm-adjusted for the best of "
                     f"{delta['n_variants']})" if ci else " (no interval yet)")
            claims.append(f"{delta['mean'] * 100:+.1f} points against {name}{where}")
    if claims:
        text += "; " + "; ".join(claims)
    survivors = sum(r["round_dropped"] == SURVIVED for r in doc["ranking"])
    return (f"{text}. Found with {doc['runs_used']} runs ({doc['runs_reused']} reused) of the "
            f"full grid's {doc['full_grid_runs']}; it stopped because "
            f"{_STOPPED[doc['stopped']]}"
            + (f", with {survivors} candidates not told apart" if survivors > 1 else "") + ".")


# --------------------------------------------------------------------------- the workspace


def start_search(search: Search) -> Task:
    """Run ``search`` as ``kdcore recommend`` in a background task (the dashboard's button:
    the server never forks); the same search again reuses its finished result or its running
    process (:func:`kdcore.store.tasks.start_task`)."""
    return start_task(search.argv(), output=search.result_path, workspace=search.workspace)


def search_task(search: Search) -> Task:
    """The task of ``search``, started or not, to ask :func:`~kdcore.store.tasks.task_status`."""
    folder = search.workspace / TASKS_DIR / task_key(search.argv())
    return Task(key=folder.name, folder=folder, output=search.result_path)


def read_progress(search: Search) -> dict | None:
    """The progress of ``search`` while it runs (round, runs done, survivors), else None."""
    return _read_json(search.progress_path)


def read_result(search: Search) -> dict | None:
    return _read_json(search.result_path)


def latest_recommendation(workspace: str | Path | None, path: str | Path,
                          data_options: Mapping | None = None) -> dict | None:
    """The newest finished search's result on the data at ``path``; None when there is none."""
    folder = (resolve_workspace(workspace, create=False) / RECOMMENDATIONS_DIR
              / data_key(path, data_options))
    if not folder.is_dir():
        return None
    found = [doc for file in folder.glob("*.json") if (doc := _read_json(file))
             and "recommended" in doc]
    return max(found, key=lambda doc: doc.get("finished_at", ""), default=None)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, doc: dict) -> None:
    """Whole or not at all: a reader (the dashboard) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
