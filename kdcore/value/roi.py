"""Return on investment: measured size, speed and serving cost of a teacher against a student.

Everything is measured on this machine, in this process, under the same thread count, so the
ratios between the two models mean something even where the absolute numbers would not carry
over to another machine:

- ``params``: trainable parameters; ``size_bytes``: bytes of ``torch.save(state_dict)``.
- latency at batch 1: after a warm-up, the teacher and the student are called alternately
  (so a noisy neighbour slows both alike) under ``torch.inference_mode``, each call timed with
  ``time.perf_counter_ns``; ``latency_ms_p50`` / ``latency_ms_p95`` are the median and the
  95th percentile of those calls.
- throughput at batch 256: rows per second of the median timed call at batch 256.
- accuracy: held-out test accuracy; for a student the mean and the standard deviation over
  every finished seed of the same settings (its "recipe").

The cost model (:class:`CostAssumptions`, every number editable and reported with the result):
a serving machine answers requests one at a time at batch 1, each taking the measured median
latency, and is busy ``utilisation`` of the time it is billed, so

    machine_hours = requests_per_month * latency_s / utilisation / 3600
    monthly       = machine_hours * cost_per_hour

No minimum bill and no always-on machine: for a tiny model at modest traffic the real bill is
at least one machine's hours, so read the result as the marginal cost of the compute.
"""

from __future__ import annotations

import contextlib
import io
import math
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kdcore.data.bundles import Bundle, load_bundle, load_dataset
from kdcore.errors import DataError
from kdcore.learning.models import build_model, count_parameters, load_weights
from kdcore.learning.teachers import load_teacher
from kdcore.store import selection
from kdcore.store.runs import Run, RunStore
from kdcore.value.formatting import format_bytes, format_money

DEFAULT_THREADS = 1
THROUGHPUT_BATCH = 256
DEFAULT_REPEATS = 300
DEFAULT_WARMUP = 30
DEFAULT_THROUGHPUT_REPEATS = 30

COST_MODEL_TEXT = (
    "one serving machine answers requests one at a time at batch 1, each taking the measured "
    "median (p50) latency; machine_hours = requests_per_month x latency_s / utilisation / 3600; "
    "monthly cost = machine_hours x cost_per_hour; no minimum bill (a real always-on machine "
    "costs at least its hours)"
)


# --------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class CostAssumptions:
    """What turns latency into money. Every field is shown next to the result."""

    requests_per_month: float = 10_000_000
    cost_per_hour: float = 0.10
    utilisation: float = 0.5

    def __post_init__(self) -> None:
        checks = (
            ("requests_per_month", self.requests_per_month, "a number of requests >= 0"),
            ("cost_per_hour", self.cost_per_hour, "a price >= 0, in dollars per hour"),
        )
        for name, value, what in checks:
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise DataError(f"cost assumption {name} = {value!r}; give {what}")
        u = self.utilisation
        if not isinstance(u, (int, float)) or not math.isfinite(u) or not 0 < u <= 1:
            raise DataError(f"cost assumption utilisation = {u!r}; give the busy share of "
                            "billed time, more than 0 and at most 1 (e.g. 0.5)")

    def to_dict(self) -> dict:
        return asdict(self)


def monthly_cost(latency_ms: float, assumptions: CostAssumptions) -> dict:
    """Machine-hours and dollars a month for one model at ``latency_ms`` per request."""
    hours = assumptions.requests_per_month * (latency_ms / 1000.0) / assumptions.utilisation / 3600
    return {"machine_hours": hours, "monthly": hours * assumptions.cost_per_hour}


def cost_model(teacher_latency_ms: float, student_latency_ms: float,
               assumptions: CostAssumptions | None = None) -> dict:
    """The ``cost`` object of ``kdcore roi --json``: assumptions, both monthly costs, saving."""
    assumptions = assumptions or CostAssumptions()
    teacher = monthly_cost(teacher_latency_ms, assumptions)
    student = monthly_cost(student_latency_ms, assumptions)
    saving = teacher["monthly"] - student["monthly"]
    return {
        "assumptions": {**assumptions.to_dict(), "latency": "p50 at batch 1",
                        "model": COST_MODEL_TEXT},
        "teacher_machine_hours": teacher["machine_hours"],
        "student_machine_hours": student["machine_hours"],
        "teacher_monthly": teacher["monthly"],
        "student_monthly": student["monthly"],
        "saving_monthly": saving,
        "saving_share": saving / teacher["monthly"] if teacher["monthly"] > 0 else None,
    }


# --------------------------------------------------------------------------- measuring


def serialized_size(model: torch.nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what a deployment ships."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(n)``; the previous count is restored after."""
    if n < 1:
        raise DataError(f"--threads {n}: give 1 or more")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def time_alternately(calls: Mapping[str, Callable[[], object]], *, repeats: int,
                     warmup: int) -> dict[str, np.ndarray]:
    """Seconds per call of each function, calling them in turn ``repeats`` times after
    ``warmup`` untimed rounds (so load on the machine falls on all of them alike)."""
    if repeats < 1 or warmup < 0:
        raise DataError("timing needs repeats >= 1 and warmup >= 0")
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    samples = {name: np.empty(repeats, dtype=np.float64) for name in names}
    clock = time.perf_counter_ns
    for i in range(repeats):
        order = names if i % 2 == 0 else names[::-1]  # neither model always goes first
        for name in order:
            fn = calls[name]
            start = clock()
            fn()
            samples[name][i] = (clock() - start) / 1e9
    return samples


def _inputs(x: np.ndarray, batch: int) -> torch.Tensor:
    """``batch`` rows of real inputs (tiled when the split is smaller), as float32."""
    if len(x) == 0:
        raise DataError("the bundle's test split is empty; timing needs at least one input row")
    reps = -(-batch // len(x))
    rows = np.concatenate([x] * reps)[:batch] if reps > 1 else x[:batch]
    return torch.as_tensor(np.ascontiguousarray(rows), dtype=torch.float32)


def measure_models(models: Mapping[str, torch.nn.Module], x: np.ndarray, *,
                   threads: int = DEFAULT_THREADS, repeats: int = DEFAULT_REPEATS,
                   warmup: int = DEFAULT_WARMUP,
                   throughput_repeats: int = DEFAULT_THROUGHPUT_REPEATS,
                   throughput_batch: int = THROUGHPUT_BATCH) -> dict:
    """Size and speed of each model, measured together in this process.

    Returns ``{name: {params, size_bytes, latency_ms_p50, latency_ms_p95, latency_ms_mean,
    latency_samples_ms, throughput_per_s, batch_ms_p50}, ..., "measurement": {...}}``.
    """
    one, many = _inputs(x, 1), _inputs(x, throughput_batch)
    for model in models.values():
        model.eval()
    with torch_threads(threads) as used, torch.inference_mode():
        single = time_alternately({n: (lambda m=m: m(one)) for n, m in models.items()},
                                  repeats=repeats, warmup=warmup)
        batched = time_alternately({n: (lambda m=m: m(many)) for n, m in models.items()},
                                   repeats=throughput_repeats, warmup=max(2, warmup // 10))
    out: dict = {}
    for name, model in models.items():
        ms = single[name] * 1000
        batch_s = float(np.median(batched[name]))
        out[name] = {
            "params": count_parameters(model),
            "size_bytes": serialized_size(model),
            "latency_ms_p50": float(np.percentile(ms, 50)),
            "latency_ms_p95": float(np.percentile(ms, 95)),
            "latency_ms_mean": float(ms.mean()),
            "latency_samples_ms": ms.tolist(),
            "throughput_per_s": throughput_batch / batch_s if batch_s > 0 else math.inf,
            "batch_ms_p50": batch_s * 1000,
        }
    out["measurement"] = {
        "device": "cpu",
        "threads": used,
        "latency_batch": 1,
        "latency_calls": repeats,
        "warmup_calls": warmup,
        "throughput_batch": throughput_batch,
        "throughput_calls": throughput_repeats,
        "mode": "torch.inference_mode, models called alternately, time.perf_counter_ns",
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
    }
    return out


# --------------------------------------------------------------------------- runs


def accuracy_spread(group: Sequence[Run]) -> dict:
    """Mean and standard deviation (ddof 1; 0 for one seed) of test accuracy over seeds."""
    acc = np.array([float(r.metrics["test_accuracy"]) for r in group])
    return {
        "accuracy": float(acc.mean()),
        "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        "seeds": [r.seed for r in group],
        "per_seed": acc.tolist(),
        "run_ids": [r.id for r in group],
    }


def pick_student(store: RunStore, bundle: Bundle | None = None,
                 run_id: str | None = None) -> tuple[Run, list[Run], Bundle]:
    """The measured student run and its seeds (kdcore.store.selection.recipe).

    With ``run_id``: that run (it must be finished). Without: on ``bundle`` (default: the
    bundled sample), the best student of the headline comparison and, of its seeds, the one
    closest to their mean (kdcore.store.selection).
    """
    done = store.list(status="done")
    if run_id is not None:
        run = store.get(run_id)
        if run.status != "done":
            raise DataError(f"run {run.id} is {run.status}, not done; pick a finished run "
                            "(`kdcore runs` lists them)")
        run_bundle = load_dataset(run.config.get("bundle") or run.bundle,
                                  **run.config.get("data_options", {}))
        if bundle is not None and Path(bundle.path).resolve() != Path(run_bundle.path).resolve():
            raise DataError(f"run {run.id} was trained on {run_bundle.path}, not {bundle.path}; "
                            "drop the BUNDLE argument or pick a run of that bundle")
        return run, selection.recipe(done, run), run_bundle
    bundle = bundle or load_bundle(None)
    groups = selection.comparable_groups(selection.on_bundle(done, bundle.path))
    key = selection.headline(groups, bundle.path)
    if key is None:
        raise DataError(f"no finished student on {bundle.name} in {store.workspace}; run "
                        "`kdcore demo` (or `kdcore train --strategy kd+be+br+dl`), or pass "
                        "--run ID")
    group = selection.by_strategy(groups[key])[selection.best_student(groups[key])]
    return selection.closest_to_mean(group), group, bundle


def load_student(store: RunStore, run: Run, bundle: Bundle) -> torch.nn.Module:
    """A finished run's student, rebuilt from the bundle's spec with its saved weights."""
    weights = store.artifact_dir(run.id) / "student.pt"
    if not weights.is_file():
        raise DataError(f"run {run.id} has no saved weights ({weights}); train it again")
    return load_weights(build_model(bundle.student_spec), weights,
                        fix="train the run again").eval()


def teacher_accuracy(bundle: Bundle) -> float:
    labels = bundle.y("test")
    return float((bundle.teacher_logits("test").argmax(1) == labels).mean())


# --------------------------------------------------------------------------- the document


def roi(store: RunStore, bundle: str | Path | Bundle | None = None, run_id: str | None = None,
        *, assumptions: CostAssumptions | None = None, threads: int = DEFAULT_THREADS,
        repeats: int = DEFAULT_REPEATS, warmup: int = DEFAULT_WARMUP,
        throughput_repeats: int = DEFAULT_THROUGHPUT_REPEATS) -> dict:
    """The ``kdcore roi --json`` document for a teacher and a student, measured now."""
    if bundle is not None and not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    run, group, bundle = pick_student(store, bundle, run_id)
    teacher, student = load_teacher(bundle), load_student(store, run, bundle)
    if teacher is None:
        raise DataError(f"{bundle.name}: a tabular dataset has the teacher's outputs but not the "
                        "teacher model; measure the student alone, or use a bundle with the "
                        "teacher's weights")
    measured = measure_models({"teacher": teacher, "student": student}, bundle.x("test"),
                              threads=threads, repeats=repeats, warmup=warmup,
                              throughput_repeats=throughput_repeats)
    spread = accuracy_spread(group)
    doc = {
        "bundle": bundle.name,
        "bundle_path": str(bundle.path),
        "run_id": run.id,
        "strategy": run.strategy,
        "teacher": {**measured["teacher"], "accuracy": teacher_accuracy(bundle),
                    "accuracy_std": None, "architecture": bundle.teacher_spec},
        "student": {**measured["student"], **spread, "architecture": bundle.student_spec},
        "measurement": measured["measurement"],
    }
    return with_assumptions(doc, assumptions)


def with_assumptions(doc: dict, assumptions: CostAssumptions | None = None) -> dict:
    """The ratios, the cost under ``assumptions`` and the summary, (re)computed from a
    measured document; the measurement itself is left as it is."""
    t, s = doc["teacher"], doc["student"]
    out = dict(doc)
    out["speedup"] = t["latency_ms_p50"] / s["latency_ms_p50"]
    out["size_ratio"] = t["size_bytes"] / s["size_bytes"]
    out["params_ratio"] = t["params"] / s["params"]
    out["throughput_ratio"] = s["throughput_per_s"] / t["throughput_per_s"]
    out["accuracy_change"] = s["accuracy"] - t["accuracy"]
    out["cost"] = cost_model(t["latency_ms_p50"], s["latency_ms_p50"], assumptions)
    out["summary"] = summary_text(out)
    return out


def _times(ratio: float, more: str, less: str) -> str:
    if not math.isfinite(ratio) or ratio <= 0:
        return f"no {more}"
    if ratio >= 1:
        return f"{ratio:,.1f}x {more}"
    return f"{1 / ratio:,.1f}x {less}"


def summary_text(doc: dict) -> str:
    """Two plain sentences computed from the numbers: what the student costs and what it saves."""
    t, s, cost = doc["teacher"], doc["student"], doc["cost"]
    a = cost["assumptions"]
    change = doc["accuracy_change"] * 100
    n = len(s.get("seeds") or [])
    spread = f" ± {s['accuracy_std'] * 100:.1f} pts" if n > 1 else ""
    direction = ("more accurate than" if change > 0.05 else "less accurate than"
                 if change < -0.05 else "as accurate as")
    points = f"{abs(change):.1f} points " if direction != "as accurate as" else ""
    first = (
        f"The {doc['strategy']} student is {_times(doc['size_ratio'], 'smaller', 'larger')} "
        f"({format_bytes(s['size_bytes'])} against {format_bytes(t['size_bytes'])}) and "
        f"answers {_times(doc['speedup'], 'faster', 'slower')} than the teacher "
        f"({s['latency_ms_p50']:.3f} ms against {t['latency_ms_p50']:.3f} ms per request, "
        f"median on this machine), and it is {points}{direction} the teacher "
        f"({s['accuracy']:.1%}{spread} over {n} seed{'s' if n != 1 else ''} against "
        f"{t['accuracy']:.1%})."
    )
    saving = cost["saving_monthly"]
    verb = "saving" if saving >= 0 else "an extra cost of"
    share = cost.get("saving_share")
    share_text = f", {abs(share):.0%} of the bill" if share is not None else ""
    second = (
        f"At {a['requests_per_month']:,.0f} requests a month on a "
        f"{format_money(a['cost_per_hour'])}/hour machine busy {a['utilisation']:.0%} of the "
        f"time, serving the student costs {format_money(cost['student_monthly'])} a month "
        f"instead of {format_money(cost['teacher_monthly'])}, {verb} "
        f"{format_money(abs(saving))} a month{share_text}."
    )
    return f"{first} {second}"


def strategy_points(doc: dict, group: Sequence[Run]) -> pd.DataFrame:
    """Teacher and every student strategy of a comparison (``group``, runs of one
    kdcore.store.selection comparison), for accuracy-vs-size and accuracy-vs-latency charts:
    one row each with ``model``, ``kind``, ``accuracy``, ``accuracy_std``, ``seeds``,
    ``params``, ``size_bytes``, ``latency_ms_p50``, ``latency_ms_p95``, ``throughput_per_s``.
    Every strategy trains the bundle's one student architecture, so the students share the
    measured student's size and speed."""
    keys = ("params", "size_bytes", "latency_ms_p50", "latency_ms_p95", "throughput_per_s")
    t, s = doc["teacher"], doc["student"]
    rows = [{"model": "teacher", "kind": "teacher", "accuracy": t["accuracy"],
             "accuracy_std": 0.0, "seeds": 0, **{k: t[k] for k in keys}}]
    for name, runs in selection.by_strategy(group).items():
        spread = accuracy_spread(runs)
        rows.append({"model": name, "kind": "student", "accuracy": spread["accuracy"],
                     "accuracy_std": spread["accuracy_std"], "seeds": len(runs),
                     **{k: s[k] for k in keys}})
    return pd.DataFrame(rows)


def roi_table(doc: dict) -> pd.DataFrame:
    """The ROI table: one row per measure, teacher / student / ratio columns, as text."""
    t, s, c = doc["teacher"], doc["student"], doc["cost"]
    n = len(s.get("seeds") or [])
    spread = f" ± {s['accuracy_std']:.1%}" if n > 1 else ""
    rows = [
        ("parameters", f"{t['params']:,}", f"{s['params']:,}",
         f"{doc['params_ratio']:,.1f}x fewer"),
        ("serialized size", format_bytes(t["size_bytes"]), format_bytes(s["size_bytes"]),
         f"{doc['size_ratio']:,.1f}x smaller"),
        ("latency, batch 1, p50", f"{t['latency_ms_p50']:.3f} ms", f"{s['latency_ms_p50']:.3f} ms",
         f"{doc['speedup']:,.1f}x faster"),
        ("latency, batch 1, p95", f"{t['latency_ms_p95']:.3f} ms", f"{s['latency_ms_p95']:.3f} ms",
         f"{t['latency_ms_p95'] / s['latency_ms_p95']:,.1f}x faster"),
        (f"throughput, batch {doc['measurement']['throughput_batch']}",
         f"{t['throughput_per_s']:,.0f}/s", f"{s['throughput_per_s']:,.0f}/s",
         f"{doc['throughput_ratio']:,.1f}x more"),
        ("test accuracy", f"{t['accuracy']:.1%}", f"{s['accuracy']:.1%}{spread} ({n} seeds)",
         f"{doc['accuracy_change'] * 100:+.1f} points"),
        ("serving cost a month", format_money(c["teacher_monthly"]),
         format_money(c["student_monthly"]), f"{format_money(c['saving_monthly'])} saved"),
    ]
    return pd.DataFrame(rows, columns=["measure", "teacher", "student", "student vs teacher"])


def public(doc: dict) -> dict:
    """The document without the raw latency samples (for printing as JSON)."""
    out = dict(doc)
    for side in ("teacher", "student"):
        out[side] = {k: v for k, v in doc[side].items() if k != "latency_samples_ms"}
    return out
