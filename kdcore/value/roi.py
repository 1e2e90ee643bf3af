"""Return on investment: measured size, speed and serving cost of a teacher against a student.

Everything is measured on this machine, in this process, under the same thread count, so the
ratios between the two models mean something even where the absolute numbers would not carry
over to another machine:

- ``params``: trainable parameters, the one meaning of "smaller"; ``size_bytes``: bytes on
  disk of ``torch.save(state_dict)`` (of the ONNX file for the ``onnx`` figures).
- one measurement: after a warm-up, the models are called alternately (so a noisy neighbour
  slows all alike), in torch under ``torch.inference_mode`` and, with ``onnx=True``, as ONNX
  Runtime sessions of the same models (kdcore.learning.export), each call timed with
  ``time.perf_counter_ns``: ``repeats`` calls at batch 1 (latency p50 / p95 of those calls)
  and ``throughput_repeats`` calls at the serving batch (``batch_ms_p50`` / ``batch_ms_p95``
  per call, and ``throughput_per_s``: rows per second of the median call).
- the whole measurement is repeated ``measurements`` times. Each figure is the median of the
  per-measurement figures, and ``<figure>_ci95`` its 95% percentile interval across the
  measurements (numpy's linear 2.5th and 97.5th percentiles of the per-measurement values;
  with 5 measurements nearly their range): where a new measurement is likely to land. It
  describes this machine's run-to-run spread, not another machine's speed.
- accuracy: held-out test accuracy; for a student the mean and the standard deviation over
  every finished seed of the same settings (its "recipe").

The cost model (:class:`CostAssumptions`, every number editable and reported with the result):
a serving machine answers requests one at a time at batch 1, each taking the measured median
latency, and is busy ``utilisation`` of the time it is billed, so

    machine_hours     = requests_per_month * latency_s / utilisation / 3600
    monthly           = machine_hours * cost_per_hour
    cost_per_million  = the same for 1,000,000 requests, so monthly = per million x requests / 1e6

No minimum bill and no always-on machine: for a tiny model at modest traffic the real bill is
at least one machine's hours, so read the result as the marginal cost of the compute. Money
carries the latency's interval through: the dollars are computed per measurement, and each
figure is their median with its percentile interval. The saving is paired within each
measurement (teacher and student were timed side by side there), so it is the median of the
per-measurement savings, which need not equal the difference of the two medians exactly.

Payback: what the student cost to make is the measured ``train_seconds`` of every seed of its
recipe, summed, at ``cost_per_hour``; ``payback_predictions`` is that divided by the saving per
prediction (its interval from the saving's, which it falls with; an open upper end where the
saving's low end is not a saving). ``negligible`` is true when the teacher's monthly bill at
the chosen traffic is under $1: the saving then means nothing, the payback does.
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
from kdcore.data.images import is_image_source
from kdcore.errors import DataError
from kdcore.learning.models import build_model, count_parameters, load_weights
from kdcore.learning.strategies import plain_name
from kdcore.learning.teachers import load_teacher
from kdcore.store import selection
from kdcore.store.runs import Run, RunStore
from kdcore.value.formatting import format_bytes, format_count, format_money

DEFAULT_THREADS = 1
DEFAULT_SERVING_BATCH = 32
DEFAULT_MEASUREMENTS = 5
DEFAULT_REPEATS = 100  # timed calls per model at batch 1, in each measurement
DEFAULT_WARMUP = 20
DEFAULT_THROUGHPUT_REPEATS = 20  # timed calls per model at the serving batch, in each one
DEFAULT_BUDGET_S = 3.0  # seconds of timed calls per phase and measurement, about (see below)
MIN_CALLS = 3  # however slow the model, each figure is a median of at least this many calls
PER_MILLION = 1_000_000
NEGLIGIBLE_MONTHLY = 1.0  # dollars: below this the teacher's bill is not worth saving on

COST_MODEL_TEXT = (
    "one serving machine answers requests one at a time at batch 1, each taking the measured "
    "median (p50) latency; machine_hours = requests_per_month x latency_s / utilisation / 3600; "
    "monthly cost = machine_hours x cost_per_hour; cost per million predictions = the same for "
    "1,000,000 requests; no minimum bill (a real always-on machine costs at least its hours); "
    "intervals: 95% percentile interval across the repeated measurements"
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


def monthly_cost(latency_ms, assumptions: CostAssumptions) -> dict:
    """Machine-hours and dollars a month for one model at ``latency_ms`` per request (a number,
    or an array of them: one per measurement)."""
    hours = assumptions.requests_per_month * (latency_ms / 1000.0) / assumptions.utilisation / 3600
    return {"machine_hours": hours, "monthly": hours * assumptions.cost_per_hour}


def ci95(values) -> list[float]:
    """The 95% percentile interval [low, high] of per-measurement values (one value: itself)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


def median_ci(values) -> dict:
    """``{median, ci95}`` of per-measurement values."""
    return {"median": float(np.median(values)), "ci95": ci95(values)}


def _paired(teacher_ms, student_ms) -> tuple[np.ndarray, np.ndarray]:
    """Per-measurement latencies of both models as arrays of one length."""
    t = np.atleast_1d(np.asarray(teacher_ms, dtype=np.float64))
    s = np.atleast_1d(np.asarray(student_ms, dtype=np.float64))
    if t.shape != s.shape or t.ndim != 1:
        raise ValueError("teacher and student latencies come from the same measurements")
    return t, s


def _priced(teacher_ms, student_ms, assumptions: CostAssumptions) -> dict:
    """Dollars of teacher, student and saving under ``assumptions``, each ``{median, ci95}`` of
    the per-measurement dollars; the saving paired within each measurement."""
    t, s = _paired(teacher_ms, student_ms)
    per_t, per_s = monthly_cost(t, assumptions)["monthly"], monthly_cost(s, assumptions)["monthly"]
    return {"teacher": median_ci(per_t), "student": median_ci(per_s),
            "saving": median_ci(per_t - per_s)}


def cost_model(teacher_latency_ms, student_latency_ms,
               assumptions: CostAssumptions | None = None) -> dict:
    """The ``cost`` object of ``kdcore roi --json``: assumptions, both monthly costs, saving,
    each with its ``_ci95``. The latencies are p50s at batch 1: one number each, or one per
    measurement (the same measurements for both)."""
    assumptions = assumptions or CostAssumptions()
    t, s = _paired(teacher_latency_ms, student_latency_ms)
    teacher = monthly_cost(float(np.median(t)), assumptions)
    student = monthly_cost(float(np.median(s)), assumptions)
    money = _priced(t, s, assumptions)
    saving = money["saving"]["median"]
    return {
        "assumptions": {**assumptions.to_dict(),
                        "latency": f"p50 at batch 1, median of {len(t)} measurement(s)",
                        "model": COST_MODEL_TEXT},
        "teacher_machine_hours": teacher["machine_hours"],
        "student_machine_hours": student["machine_hours"],
        "teacher_monthly": teacher["monthly"],
        "teacher_monthly_ci95": money["teacher"]["ci95"],
        "student_monthly": student["monthly"],
        "student_monthly_ci95": money["student"]["ci95"],
        "saving_monthly": saving,
        "saving_monthly_ci95": money["saving"]["ci95"],
        "saving_share": saving / teacher["monthly"] if teacher["monthly"] > 0 else None,
    }


def cost_per_million(teacher_latency_ms, student_latency_ms,
                     assumptions: CostAssumptions | None = None) -> dict:
    """Dollars per million predictions at batch 1 (the monthly model at 1,000,000 requests):
    ``{teacher, student, saving}``, each ``{median, ci95}``."""
    a = assumptions or CostAssumptions()
    million = CostAssumptions(requests_per_month=PER_MILLION, cost_per_hour=a.cost_per_hour,
                              utilisation=a.utilisation)
    return _priced(teacher_latency_ms, student_latency_ms, million)


def training_cost(train_seconds: Sequence[float], assumptions: CostAssumptions) -> dict:
    """What the student cost to make: the training seconds of the runs behind it, summed, and
    their price at ``cost_per_hour``."""
    seconds = float(sum(train_seconds))
    return {"seconds": seconds, "dollars": seconds * assumptions.cost_per_hour / 3600,
            "runs": len(train_seconds)}


def payback(training_dollars: float, saving_per_million: dict) -> dict:
    """Predictions before the serving saving repays ``training_dollars``: ``{median, ci95,
    reason}``; the median None (and a reason) when the student saves nothing, the interval's
    upper end None where the saving's low end is not a saving."""
    per_prediction = saving_per_million["median"] / PER_MILLION
    low, high = (v / PER_MILLION for v in saving_per_million["ci95"])
    if per_prediction <= 0:
        return {"median": None, "ci95": [None, None],
                "reason": "the student saves nothing per prediction (it is not faster on "
                          "this measurement, or the machine costs nothing), so serving it "
                          "never repays its training"}
    return {"median": training_dollars / per_prediction,
            "ci95": [training_dollars / high if high > 0 else None,
                     training_dollars / low if low > 0 else None],
            "reason": None}


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


def _onnx_calls(models: Mapping[str, torch.nn.Module], x: np.ndarray, threads: int
                ) -> dict[str, tuple[object, int]]:
    """Each model as an ONNX Runtime session (with ``threads`` threads) and its ONNX bytes."""
    from kdcore.learning.export import onnx_bytes, onnx_session

    out = {}
    for name, model in models.items():
        predictor = getattr(model, "predictor", None)  # a teacher that is an ONNX file already
        file = getattr(predictor, "file", None)
        data = Path(file).read_bytes() if file is not None else onnx_bytes(model, x[:2])
        out[name] = (onnx_session(data, threads=threads), len(data))
    return out


def _figures(single: list[np.ndarray], batched: list[np.ndarray], batch: int) -> dict:
    """The latency and throughput figures of one model from its per-measurement seconds."""
    per = {
        "latency_ms_p50": [float(np.percentile(m * 1000, 50)) for m in single],
        "latency_ms_p95": [float(np.percentile(m * 1000, 95)) for m in single],
        "batch_ms_p50": [float(np.percentile(m * 1000, 50)) for m in batched],
        "batch_ms_p95": [float(np.percentile(m * 1000, 95)) for m in batched],
    }
    per["throughput_per_s"] = [batch / (ms / 1000) if ms > 0 else math.inf
                               for ms in per["batch_ms_p50"]]
    samples = np.concatenate(single) * 1000
    out: dict = {}
    for key, values in per.items():
        out[key] = float(np.median(values))
        out[f"{key}_ci95"] = ci95(values)
    out["latency_ms_mean"] = float(samples.mean())
    out["latency_samples_ms"] = samples.tolist()
    out["per_measurement"] = per
    return out


def measure_models(models: Mapping[str, torch.nn.Module], x: np.ndarray, *,
                   threads: int = DEFAULT_THREADS, repeats: int = DEFAULT_REPEATS,
                   warmup: int = DEFAULT_WARMUP,
                   throughput_repeats: int = DEFAULT_THROUGHPUT_REPEATS,
                   serving_batch: int = DEFAULT_SERVING_BATCH,
                   measurements: int = 1, onnx: bool = False,
                   budget_s: float | None = DEFAULT_BUDGET_S) -> dict:
    """Size and speed of each model, measured together in this process, ``measurements``
    times over (see the module's docstring). With ``budget_s``, a model slow enough that
    ``repeats`` calls would take longer gets fewer calls (at least :data:`MIN_CALLS`), so a
    real vision model is measured in about a minute, not ten; the calls used are reported.

    Returns ``{name: {params, size_bytes, latency_ms_p50, latency_ms_p95, latency_ms_mean,
    latency_samples_ms, throughput_per_s, batch_ms_p50, batch_ms_p95, per_measurement}, ...,
    "measurement": {...}}``, each median figure with its ``<figure>_ci95``; with ``onnx``
    also ``"onnx": {name: {...}}``, the same figures of the models run by ONNX Runtime.
    """
    for what, n in (("measurements", measurements), ("--serving-batch", serving_batch),
                    ("throughput repeats", throughput_repeats)):
        if n < 1:
            raise DataError(f"{what} {n}: give 1 or more")
    one, many = _inputs(x, 1), _inputs(x, serving_batch)
    for model in models.values():
        if not isinstance(model, torch.fx.GraphModule):  # a program keeps its saved mode
            model.eval()
    sessions = _onnx_calls(models, one.numpy(), threads) if onnx else {}
    single: dict[str, list[np.ndarray]] = {}
    batched: dict[str, list[np.ndarray]] = {}

    def calls_at(inputs: torch.Tensor) -> dict:
        fns = {("torch", n): (lambda m=m, v=inputs: m(v)) for n, m in models.items()}
        arr = inputs.numpy()
        for n, (session, _) in sessions.items():
            feed = {session.get_inputs()[0].name: arr}
            fns[("onnx", n)] = lambda s=session, f=feed: s.run(None, f)
        return fns

    with torch_threads(threads) as used, torch.inference_mode():
        phases = []
        for inputs, runs, calls, warm in ((one, single, repeats, warmup),
                                          (many, batched, throughput_repeats,
                                           max(2, warmup // 10))):
            fns = calls_at(inputs)
            calls, warm = _within_budget(fns, calls, warm, budget_s)
            phases.append((fns, runs, calls, warm))
        for _ in range(measurements):
            for fns, runs, calls, warm in phases:
                timed = time_alternately(fns, repeats=calls, warmup=warm)
                for key, seconds in timed.items():
                    runs.setdefault(key, []).append(seconds)
    repeats, warmup = phases[0][2], phases[0][3]
    throughput_repeats = phases[1][2]
    out: dict = {}
    for name, model in models.items():
        out[name] = {"params": count_parameters(model), "size_bytes": serialized_size(model),
                     **_figures(single["torch", name], batched["torch", name], serving_batch)}
    if onnx:
        out["onnx"] = {name: {"params": out[name]["params"], "size_bytes": size,
                              **_figures(single["onnx", name], batched["onnx", name],
                                         serving_batch)}
                       for name, (_, size) in sessions.items()}
    out["measurement"] = {
        "device": "cpu",
        "threads": used,
        "latency_batch": 1,
        "latency_calls": repeats,
        "warmup_calls": warmup,
        "throughput_batch": serving_batch,
        "throughput_calls": throughput_repeats,
        "measurements": measurements,
        "interval": "95% percentile interval of the per-measurement figures",
        "mode": ("torch.inference_mode" + (" and ONNX Runtime (CPU)" if onnx else "")
                 + ", models called alternately, time.perf_counter_ns"),
        "torch": torch.__version__,
        "onnxruntime": _ort_version() if onnx else None,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
    }
    return out


def _within_budget(fns: Mapping, calls: int, warmup: int, budget_s: float | None
                   ) -> tuple[int, int]:
    """The timed calls and warm-up calls per measurement that fit ``budget_s`` seconds, from one
    untimed round (which also warms up); unchanged without a budget or when they fit."""
    if budget_s is None:
        return calls, warmup
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    round_s = max(time.perf_counter() - start, 1e-9)
    if round_s * (calls + warmup) <= budget_s:
        return calls, warmup
    fitted = max(MIN_CALLS, min(calls, int(budget_s / round_s)))
    return fitted, min(warmup, max(1, fitted // 5))


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


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


def train_seconds(run: Run) -> float:
    """Seconds the run trained for: its measured ``train_seconds``, else start to finish."""
    value = run.metrics.get("train_seconds")
    return float(value if value is not None else run.duration_s or 0.0)


def is_image_run(run: Run) -> bool:
    """A run of the image trainer (kdcore.learning.image_train): its config names the student
    architecture instead of taking it from a bundle's manifest."""
    return bool(run.config.get("student_arch"))


def run_dataset(run: Run) -> Bundle:
    """The bundle or table a (bundle or tabular) run was trained on, with its data options."""
    return load_dataset(run.config.get("bundle") or run.bundle,
                        **run.config.get("data_options", {}))


def best_image_run(store: RunStore, folder: str | Path) -> str:
    """The run ROI prices on an image folder: as on a bundle, the headline comparison's best
    student (``selection.best_student``), the seed closest to its mean."""
    done = store.list(status="done")
    groups = selection.comparable_groups(selection.on_bundle(done, folder))
    key = selection.headline(groups, folder)
    if key is None:
        raise DataError(f"no finished student on {folder} in {store.workspace}; train one with "
                        "`kdcore compare IMAGES --student ARCH ...`, or pass --run ID")
    group = selection.by_strategy(groups[key])[selection.best_student(groups[key])]
    return selection.closest_to_mean(group).id


def pick_student(store: RunStore, bundle: Bundle | None = None,
                 run_id: str | None = None) -> tuple[Run, list[Run], Bundle | None]:
    """The measured student run, its seeds (kdcore.store.selection.recipe) and its bundle
    (None for an image run, whose data is an image folder).

    With ``run_id``: that run (it must be finished). Without: on ``bundle`` (default: the
    bundled sample), "the student" of the headline comparison, the strategy
    ``selection.best_student`` picks (ce included, as compare's verdict), and of its seeds the
    one closest to their mean (kdcore.store.selection).
    """
    done = store.list(status="done")
    if run_id is not None:
        run = store.get(run_id)
        if run.status != "done":
            raise DataError(f"run {run.id} is {run.status}, not done; pick a finished run "
                            "(`kdcore runs` lists them)")
        run_bundle = None if is_image_run(run) else run_dataset(run)
        trained_on = Path(run_bundle.path if run_bundle else run.config["bundle"])
        if bundle is not None and Path(bundle.path).resolve() != trained_on.resolve():
            raise DataError(f"run {run.id} was trained on {trained_on}, not {bundle.path}; "
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


def _student_weights(store: RunStore, run: Run) -> Path:
    weights = store.artifact_dir(run.id) / "student.pt"
    if not weights.is_file():
        raise DataError(f"run {run.id} has no saved weights ({weights}); train it again")
    return weights


def load_student(store: RunStore, run: Run, bundle: Bundle) -> torch.nn.Module:
    """A finished run's student, rebuilt from the bundle's spec with its saved weights."""
    return load_weights(build_model(bundle.student_spec), _student_weights(store, run),
                        fix="train the run again").eval()


def models_for(run: Run, store: RunStore) -> tuple[torch.nn.Module | None, torch.nn.Module,
                                                    np.ndarray]:
    """``(teacher, student, inputs)`` of a finished run: both models in eval mode, the student
    with its trained weights, and real test inputs to time and check them on. The teacher is
    None for a tabular dataset, which holds the teacher's outputs but not the teacher."""
    if is_image_run(run):
        from kdcore.learning.image_train import load_run_models

        teacher, skeleton, inputs = load_run_models(run.config)
        student = load_weights(skeleton, _student_weights(store, run), fix="train the run again")
        inner = getattr(teacher, "model", None)
        if getattr(teacher, "predictor", None) is None and isinstance(inner, torch.nn.Module):
            teacher = inner  # measured and exported as itself, not through the frozen wrapper
        return teacher, student.eval(), inputs
    bundle = run_dataset(run)
    return load_teacher(bundle), load_student(store, run, bundle), bundle.x("test")


def teacher_accuracy(bundle: Bundle) -> float:
    labels = bundle.y("test")
    return float((bundle.teacher_logits("test").argmax(1) == labels).mean())


# --------------------------------------------------------------------------- the document


def roi(store: RunStore, bundle: str | Path | Bundle | None = None, run_id: str | None = None,
        *, assumptions: CostAssumptions | None = None, threads: int = DEFAULT_THREADS,
        repeats: int = DEFAULT_REPEATS, warmup: int = DEFAULT_WARMUP,
        throughput_repeats: int = DEFAULT_THROUGHPUT_REPEATS,
        serving_batch: int = DEFAULT_SERVING_BATCH,
        measurements: int = DEFAULT_MEASUREMENTS) -> dict:
    """The ``kdcore roi --json`` document for a teacher and a student, measured now in torch
    and in ONNX Runtime."""
    if bundle is not None and not isinstance(bundle, Bundle):
        if is_image_source(bundle):  # a folder of images: its runs say how to load the models
            run_id, bundle = run_id or best_image_run(store, bundle), None
        else:
            bundle = load_bundle(bundle)
    run, group, bundle = pick_student(store, bundle, run_id)
    teacher, student, inputs = models_for(run, store)
    if teacher is None:
        raise DataError(f"{bundle.name}: a tabular dataset has the teacher's outputs but not the "
                        "teacher model; measure the student alone, or use a bundle with the "
                        "teacher's weights")
    measured = measure_models({"teacher": teacher, "student": student}, inputs,
                              threads=threads, repeats=repeats, warmup=warmup,
                              throughput_repeats=throughput_repeats, serving_batch=serving_batch,
                              measurements=measurements, onnx=True)
    spread = accuracy_spread(group)
    config = run.config
    if bundle is None:  # an image run: its folder, its architectures, its measured teacher
        name, path = Path(config["bundle"]).name, str(config["bundle"])
        accuracy = run.metrics.get("teacher_test_accuracy")
        architectures = ({"type": config.get("teacher_arch")
                          or Path(config.get("teacher_model") or "").name},
                         {"type": config["student_arch"]})
    else:
        name, path, accuracy = bundle.name, str(bundle.path), teacher_accuracy(bundle)
        architectures = (bundle.teacher_spec, bundle.student_spec)
    doc = {
        "bundle": name,
        "bundle_path": path,
        "run_id": run.id,
        "strategy": run.strategy,
        "teacher": {**measured["teacher"], "accuracy": accuracy, "accuracy_std": None,
                    "architecture": architectures[0]},
        "student": {**measured["student"], **spread, "architecture": architectures[1],
                    "train_seconds": [train_seconds(r) for r in group]},
        "onnx": measured["onnx"],
        "measurement": measured["measurement"],
        "measurements": {"count": measurements,  # the calls used (a slow model gets fewer)
                         "calls_each": measured["measurement"]["latency_calls"],
                         "serving_calls_each": measured["measurement"]["throughput_calls"],
                         "serving_batch": serving_batch},
    }
    return with_assumptions(doc, assumptions)


def with_assumptions(doc: dict, assumptions: CostAssumptions | None = None) -> dict:
    """The ratios, the money under ``assumptions`` (cost, cost per million, training cost,
    payback) and the summary, (re)computed from a measured document; the measurement itself
    is left as it is."""
    assumptions = assumptions or CostAssumptions()
    t, s = doc["teacher"], doc["student"]
    out = dict(doc)
    out["speedup"] = t["latency_ms_p50"] / s["latency_ms_p50"]
    out["size_ratio"] = t["size_bytes"] / s["size_bytes"]
    out["params_ratio"] = t["params"] / s["params"]
    out["throughput_ratio"] = s["throughput_per_s"] / t["throughput_per_s"]
    out["accuracy_change"] = s["accuracy"] - t["accuracy"]
    latencies = (_per_measurement(t), _per_measurement(s))
    out["cost"] = cost_model(*latencies, assumptions)
    out["cost_per_million"] = cost_per_million(*latencies, assumptions)
    out["student_training_cost"] = training_cost(s.get("train_seconds") or [], assumptions)
    out["payback_predictions"] = payback(out["student_training_cost"]["dollars"],
                                         out["cost_per_million"]["saving"])
    out["negligible"] = out["cost"]["teacher_monthly"] < NEGLIGIBLE_MONTHLY
    out["summary"] = summary_text(out)
    return out


def _per_measurement(side: dict) -> list[float]:
    """A model's batch-1 p50 latency per measurement (one measurement: its p50)."""
    return side.get("per_measurement", {}).get("latency_ms_p50") or [side["latency_ms_p50"]]


def _times(ratio: float, more: str, less: str) -> str:
    if not math.isfinite(ratio) or ratio <= 0:
        return f"no {more}"
    if ratio >= 1:
        return f"{ratio:,.1f}x {more}"
    return f"{1 / ratio:,.1f}x {less}"


def _interval(figure: dict) -> str:
    low, high = figure["ci95"]
    return f"95% interval {format_money(low)} to {format_money(high)}"


def payback_text(doc: dict) -> str:
    """What making the student cost and how many predictions repay it, in one sentence."""
    made, back = doc["student_training_cost"], doc["payback_predictions"]
    runs = made.get("runs", 0)
    cost = (f"Training the student cost {format_money(made['dollars'])} "
            f"({made['seconds']:,.1f} s of training over {runs} run{'s' if runs != 1 else ''} "
            f"at {format_money(doc['cost']['assumptions']['cost_per_hour'])}/hour)")
    if back["median"] is None:
        return f"{cost}; {back['reason']}."
    low, high = back["ci95"]
    upper = format_count(high) if high is not None else "never (the saving may be nothing)"
    return (f"{cost}; the serving saving repays it after {format_count(back['median'])} "
            f"predictions (95% interval {format_count(low) if low is not None else 'n/a'} to "
            f"{upper}).")


def summary_text(doc: dict) -> str:
    """Plain sentences computed from the numbers: what the student is, what serving it costs
    per million predictions and a month, and when it pays back. When the teacher's monthly
    bill is negligible at this traffic it says so and leads with the payback."""
    t, s, cost = doc["teacher"], doc["student"], doc["cost"]
    a = cost["assumptions"]
    change = doc["accuracy_change"] * 100
    n = len(s.get("seeds") or [])
    spread = f" ± {s['accuracy_std'] * 100:.1f} pts" if n > 1 else ""
    direction = ("more accurate than" if change > 0.05 else "less accurate than"
                 if change < -0.05 else "as accurate as")
    points = f"{abs(change):.1f} points " if direction != "as accurate as" else ""
    count = doc.get("measurements", {}).get("count", 1)
    first = (
        f"The {doc['strategy']} student ({plain_name(doc['strategy'])}) is "
        f"{_times(doc['params_ratio'], 'smaller', 'larger')} (parameters: {s['params']:,} "
        f"against {t['params']:,}; {format_bytes(s['size_bytes'])} against "
        f"{format_bytes(t['size_bytes'])} on disk) and answers "
        f"{_times(doc['speedup'], 'faster', 'slower')} than the teacher "
        f"({s['latency_ms_p50']:.3f} ms against {t['latency_ms_p50']:.3f} ms per request, "
        f"median of {count} measurement{'s' if count != 1 else ''} on this machine), and it is "
        f"{points}{direction} the teacher ({s['accuracy']:.1%}{spread} over {n} "
        f"seed{'s' if n != 1 else ''} against {t['accuracy']:.1%})."
    )
    per = doc["cost_per_million"]
    saving = per["saving"]["median"]
    verb = "saving" if saving >= 0 else "an extra cost of"
    million = (
        f"Serving a million predictions costs {format_money(per['student']['median'])} with the "
        f"student instead of {format_money(per['teacher']['median'])} with the teacher, {verb} "
        f"{format_money(abs(saving))} per million ({_interval(per['saving'])})."
    )
    traffic = (f"{a['requests_per_month']:,.0f} requests a month on a "
               f"{format_money(a['cost_per_hour'])}/hour machine busy {a['utilisation']:.0%} of "
               "the time")
    if doc.get("negligible"):
        monthly = cost["saving_monthly"]
        lead = (f"Serving cost is negligible at this traffic: at {traffic}, the teacher costs "
                f"{format_money(cost['teacher_monthly'])} a month, so the student's "
                f"{format_money(abs(monthly))} a month {'saved' if monthly >= 0 else 'extra'} "
                "does not matter; what matters is how soon it repays its training.")
        return " ".join((first, lead, payback_text(doc), million))
    monthly = cost["saving_monthly"]
    share = cost.get("saving_share")
    share_text = f", {abs(share):.0%} of the bill" if share is not None else ""
    month = (
        f"At {traffic}, serving the student costs {format_money(cost['student_monthly'])} a "
        f"month instead of {format_money(cost['teacher_monthly'])}, "
        f"{'saving' if monthly >= 0 else 'an extra cost of'} {format_money(abs(monthly))} a "
        f"month{share_text} ({_interval({'ci95': cost['saving_monthly_ci95']})})."
    )
    return " ".join((first, million, month, payback_text(doc)))


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


def _ms(side: dict, key: str) -> str:
    """A latency figure in ms with its interval across measurements, where it has one."""
    ci = side.get(f"{key}_ci95")
    spread = f" [{ci[0]:.3f} to {ci[1]:.3f}]" if ci and ci[0] != ci[1] else ""
    return f"{side[key]:.3f} ms{spread}"


def roi_table(doc: dict) -> pd.DataFrame:
    """The ROI table: one row per measure, teacher / student / ratio columns, as text; the
    measured figures as median [95% interval across measurements]."""
    t, s, c = doc["teacher"], doc["student"], doc["cost"]
    n = len(s.get("seeds") or [])
    spread = f" ± {s['accuracy_std']:.1%}" if n > 1 else ""
    batch = doc["measurement"]["throughput_batch"]
    engines = [("", t, s)]
    if doc.get("onnx"):
        engines.append((", ONNX Runtime", doc["onnx"]["teacher"], doc["onnx"]["student"]))
    rows = [
        ("parameters", f"{t['params']:,}", f"{s['params']:,}",
         f"{doc['params_ratio']:,.1f}x smaller (fewer parameters)"),
        ("bytes on disk (serialized size)", format_bytes(t["size_bytes"]),
         format_bytes(s["size_bytes"]), f"{doc['size_ratio']:,.1f}x fewer bytes"),
    ]
    for engine, te, st in engines:
        rows += [
            (f"latency, batch 1, p50{engine}", _ms(te, "latency_ms_p50"),
             _ms(st, "latency_ms_p50"),
             f"{te['latency_ms_p50'] / st['latency_ms_p50']:,.1f}x faster"),
            (f"latency, batch 1, p95{engine}", _ms(te, "latency_ms_p95"),
             _ms(st, "latency_ms_p95"),
             f"{te['latency_ms_p95'] / st['latency_ms_p95']:,.1f}x faster"),
            (f"throughput, batch {batch}{engine}", f"{te['throughput_per_s']:,.0f}/s",
             f"{st['throughput_per_s']:,.0f}/s",
             f"{st['throughput_per_s'] / te['throughput_per_s']:,.1f}x more"),
        ]
    rows.append(("test accuracy", f"{t['accuracy']:.1%}",
                 f"{s['accuracy']:.1%}{spread} ({n} seeds)",
                 f"{doc['accuracy_change'] * 100:+.1f} points"))
    per = doc.get("cost_per_million")
    if per:
        rows.append(("cost per million predictions", format_money(per["teacher"]["median"]),
                     format_money(per["student"]["median"]),
                     f"{format_money(per['saving']['median'])} saved"))
    rows.append(("serving cost a month", format_money(c["teacher_monthly"]),
                 format_money(c["student_monthly"]),
                 f"{format_money(c['saving_monthly'])} saved"))
    return pd.DataFrame(rows, columns=["measure", "teacher", "student", "student vs teacher"])


def public(doc: dict) -> dict:
    """The document without the raw latency samples (for printing as JSON)."""
    out = dict(doc)
    for side in ("teacher", "student"):
        out[side] = {k: v for k, v in doc[side].items() if k != "latency_samples_ms"}
    if doc.get("onnx"):
        out["onnx"] = {side: {k: v for k, v in figures.items() if k != "latency_samples_ms"}
                       for side, figures in doc["onnx"].items()}
    return out
