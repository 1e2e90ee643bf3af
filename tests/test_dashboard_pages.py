"""AppTest checks of the dashboard's Overview, Teacher bias and Data pages (and the router)."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from kdcore.analysis.analyzer import report, select
from kdcore.data.bundles import load_bundle
from kdcore.data.sources import load_predictions
from kdcore.errors import DataError
from kdcore.store import selection
from kdcore.store.runs import RunStore
from kdcore.value.compare import plan, run_all, summarise
from kdcore.value.predictions import load_test_predictions
from kdcore_app import state

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "dashboard" / "app_pages"
TIMEOUT = 60


def page(name: str) -> AppTest:
    return AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runs_home(tmp_path_factory) -> Path:
    """A workspace with a few finished tiny runs on the bundled sample."""
    home = tmp_path_factory.mktemp("ws_runs")
    store = RunStore(home)
    configs = plan(load_bundle(None), ["ce", "kd", "kd+be+br+dl"], range(2), epochs=2)
    # AppTest leaves the last page script as __main__; spawned workers must not re-run it
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        run_all(store, configs, workers=1)
    finally:
        sys.modules["__main__"] = main
        store.close()
    return home


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path / "ws"))
    return tmp_path / "ws"


@pytest.fixture
def with_runs(runs_home, monkeypatch) -> Path:
    monkeypatch.setenv("KDCORE_HOME", str(runs_home))
    return runs_home


class FakeUpload(io.BytesIO):
    """What st.file_uploader returns, enough for the Data page."""

    def __init__(self, name: str, data: bytes) -> None:
        super().__init__(data)
        self.name, self.size, self.file_id = name, len(data), f"{name}-{len(data)}"


# ---------------------------------------------------------------- overview


def test_overview_empty_store_offers_the_demo(empty_home):
    at = page("overview").run()
    assert not at.exception
    assert [b.label for b in at.button] == ["Run the demo"]
    assert not at.error


def test_overview_with_runs_shows_headline_numbers(with_runs):
    at = page("overview").run()
    assert not at.exception
    labels = [m.label for m in at.metric]
    assert labels[0] == "Teacher accuracy"
    best = selection.best_student(RunStore(with_runs).list(status="done"))
    assert (f"Best student: {best}" if best != "ce" else "Best: train on labels alone") in labels
    assert "Distillation vs labels alone" in labels
    assert "Student size (parameters)" in labels
    assert at.info and at.info[0].value  # the verdict sentence
    assert "Run the demo" not in [b.label for b in at.button]  # not once runs are finished


# ---------------------------------------------------------------- teacher bias


def _plotly_count(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def test_teacher_bias_renders_and_reacts_to_split(empty_home):
    at = page("teacher_bias").run()
    assert not at.exception and not at.error
    test_rep = report(select(load_predictions(None), "test"))
    assert at.metric[0].value == f"{test_rep.accuracy:.1%}"
    assert _plotly_count(at) >= 5  # bias bars, heatmap, samples, pairs, confidence charts
    at.radio(key="bias_split").set_value("train").run()
    assert not at.exception
    train_rep = report(select(load_predictions(None), "train"))
    assert at.metric[3].value == f"{train_rep.n_samples:,}"
    at.radio(key="bias_split").set_value("all").run()
    assert not at.exception
    assert at.metric[3].value == f"{train_rep.n_samples + test_rep.n_samples:,}"


def test_teacher_bias_manual_filter_and_normalise(empty_home):
    at = page("teacher_bias").run()
    at.toggle(key="bias_normalise").set_value(True).run()
    assert not at.exception
    at.selectbox(key="bias_true").set_value(4)
    at.selectbox(key="bias_pred").set_value(9).run()
    assert not at.exception
    assert any("samples match" in c.value for c in at.caption)
    at.selectbox(key="bias_true").set_value(0)
    at.selectbox(key="bias_pred").set_value(0).run()
    assert not at.exception
    assert any("No samples match" in i.value for i in at.info)


def test_teacher_bias_on_an_uploaded_table(empty_home):
    table = state.validate_upload("mine.csv", state.example_csv("test"))
    at = page("teacher_bias")
    at.session_state[state.UPLOADS] = {"mine.csv (uploaded)": table}
    at.session_state[state.UPLOAD_TOKENS] = {"mine.csv (uploaded)": "t1"}
    at.run()
    at.selectbox(key="bias_source").set_value("mine.csv (uploaded)").run()
    assert not at.exception and not at.error
    assert at.metric[3].value == f"{table.n_samples:,}"


# ---------------------------------------------------------------- data


def test_upload_validation_reports_the_fix():
    with pytest.raises(DataError, match="logit_"):
        state.validate_upload("bad.csv", b"label,foo\n1,2\n")
    table = state.validate_upload("good.csv", state.example_csv("test"))
    assert table.n_samples > 0 and table.splits == ["test"]


def test_data_page_rejects_a_bad_upload_and_accepts_a_good_one(empty_home, monkeypatch):
    upload = {"file": None}
    monkeypatch.setattr(st, "file_uploader", lambda *a, **k: upload["file"])
    at = page("data").run()
    assert not at.exception and not at.error
    upload["file"] = FakeUpload("bad.csv", b"label,foo\n1,2\n")
    at.run()
    assert not at.exception
    assert at.error and "bad.csv" in at.error[0].value and "logit_" in at.error[0].value
    upload["file"] = FakeUpload("good.csv", state.example_csv("test"))
    at.run()
    assert not at.exception and not at.error
    assert "good.csv (uploaded)" in at.session_state[state.UPLOADS]


# ---------------------------------------------------------------- router


def test_router_renders_every_page(with_runs):
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=TIMEOUT).run()
    assert not at.exception
    for name in ("teacher_bias", "data", "overview"):
        at.switch_page(f"app_pages/{name}.py").run()
        assert not at.exception, name



# ---------------------------------------------------------------- results: the decision

DECISION_CARDS = ["Distil? (against labels alone)", "Best strategy", "Beats the teacher?"]


def _crafted_run(store: RunStore, bundle, strategy: str, seed: int, fix: float,
                 breaks: float, epochs: int | None = 2) -> str:
    """A finished run without training: the student repeats the teacher, except that it fixes
    a share ``fix`` of the teacher's test mistakes and breaks a share ``breaks`` of its right
    answers (drawn from the seed). Metrics are computed from the saved predictions."""
    from kdcore.analysis.metrics import bias_inheritance, per_class_accuracy
    from kdcore.learning.train import TrainConfig

    labels = bundle.y("test")
    teacher_logits = bundle.teacher_logits("test")
    teacher = teacher_logits.argmax(1)
    k = teacher_logits.shape[1]
    rng = np.random.default_rng(1000 * seed + len(strategy))
    pred = teacher.copy()
    wrong = teacher != labels
    pred = np.where(wrong & (rng.random(len(pred)) < fix), labels, pred)
    broken = ~wrong & (rng.random(len(pred)) < breaks)
    pred[broken] = (labels[broken] + 1) % k
    logits = np.eye(k, dtype=np.float32)[pred] * 4.0
    config = TrainConfig.for_bundle(bundle, strategy=strategy, seed=seed,
                                    **({"epochs": epochs} if epochs else {})).to_dict()
    run_id = store.create(config)
    folder = store.artifact_dir(run_id)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / "test_predictions.npz", logits=logits, labels=labels,
                        teacher_logits=teacher_logits)
    accuracy = float((pred == labels).mean())
    store.start(run_id)
    store.finish(run_id, {
        "test_accuracy": accuracy, "best_test_accuracy": accuracy,
        "bias_inheritance": bias_inheritance(pred, teacher, labels),
        "teacher_test_accuracy": float((teacher == labels).mean()),
        "per_class_accuracy": per_class_accuracy(pred, labels, bundle.class_names)})
    return run_id


@pytest.fixture(scope="module")
def ce_wins_home(tmp_path_factory) -> Path:
    """Crafted runs where training on labels alone (ce) clearly beats distillation (kd)."""
    home = tmp_path_factory.mktemp("ws_ce_wins")
    store, bundle = RunStore(home), load_bundle(None)
    for seed in range(3):
        _crafted_run(store, bundle, "ce", seed, fix=0.8, breaks=0.01)
        _crafted_run(store, bundle, "kd", seed, fix=0.05, breaks=0.15)
    store.close()
    return home


def _texts(at: AppTest) -> list[str]:
    """Every text a reader sees: markdown, captions, callouts, metric labels, values, deltas."""
    out = []
    for kind in ("markdown", "caption", "info", "warning", "subheader"):
        out += [str(e.value) for e in at.get(kind)]
    for m in at.metric:
        out += [m.label, str(m.value), m.proto.delta]
    return out


def test_results_page_answers_the_three_questions_first(with_runs):
    at = page("results").run()
    assert not at.exception and not at.error
    store = RunStore(with_runs)
    summary = summarise(store.list(status="done"), store)
    assert at.info[0].value.startswith(f"**{summary['verdict'].split(':')[0]}:**")
    labels = [m.label for m in at.metric]
    assert labels[:3] == DECISION_CARDS  # the answers come before today's comparison
    decision = summary["decision"]
    assert at.metric[0].value == {True: "Yes", False: "No", None: "Cannot tell"}[
        decision["distil"]]
    assert at.metric[1].value == decision["best_strategy"]
    assert "best of 2" in at.metric[0].proto.delta  # kd and kd+be+br+dl were tried
    charts = " ".join(c.proto.id for c in at.get("plotly_chart"))
    for key in ("results_significance_chart", "results_error_map_", "results_reliability_chart",
                "results_inheritance_chart", "results_err_images"):
        assert key in charts, key
    assert not [t for t in _texts(at) if "None" in t or " nan" in t]
    calibration = next(d.value for d in at.dataframe if "ece" in d.value.columns)
    assert calibration["model"].tolist()[0] == "teacher"
    assert calibration["ece"].iloc[0] == pytest.approx(100 * summary["calibration"]["teacher"]
                                                       ["ece"])


def test_results_page_per_class_comparisons_and_strategies_switch(with_runs):
    at = page("results").run()
    at.selectbox(key="results_sig_strategy").set_value("kd+be+br+dl").run()
    assert at.radio(key="results_sig_against").options == [
        "ce (labels alone)", "vanilla KD", "the teacher"]
    for choice in ("kd", "teacher", "ce"):
        at.radio(key="results_sig_against").set_value(choice).run()
        assert not at.exception and not at.error, choice
        table = next(d.value for d in at.dataframe if "significant" in d.value.columns)
        assert len(table) == 10  # one row per class of the sample
    at.selectbox(key="results_sig_strategy").set_value("kd").run()
    assert not at.exception and not at.error
    assert at.radio(key="results_sig_against").value in ("ce", "teacher")  # not kd against kd
    at.selectbox(key="results_err_strategy").set_value("kd+be+br+dl").run()
    at.selectbox(key="results_err_seed_kd+be+br+dl").set_value(1).run()
    assert not at.exception and not at.error
    at.multiselect(key="results_calibration_strategies").set_value(["ce", "kd"]).run()
    assert not at.exception and not at.error


def test_results_page_when_labels_alone_win(ce_wins_home, monkeypatch):
    monkeypatch.setenv("KDCORE_HOME", str(ce_wins_home))
    store = RunStore(ce_wins_home)
    runs = store.list(status="done")
    summary = summarise(runs, store)
    assert summary["decision"]["distil"] is False  # the crafted data says so
    at = page("results").run()
    assert not at.exception and not at.error
    assert at.info[0].value.startswith("**Do not distil:**")
    assert [m.value for m in at.metric[:2]] == ["No", "ce"]
    assert "Best: train on labels alone (ce)" in [m.label for m in at.metric]

    # the error map shows the median seed of ce; its counts come from the saved predictions
    ce_runs = sorted((r for r in runs if r.strategy == "ce"),
                     key=lambda r: r.metrics["test_accuracy"])
    median = ce_runs[1]
    assert at.selectbox(key="results_err_seed_ce").value == median.seed
    preds = load_test_predictions(store, median)
    fixed = int(((preds.teacher_logits.argmax(1) != preds.labels)
                 & (preds.logits.argmax(1) == preds.labels)).sum())
    chart = next(c for c in at.get("plotly_chart") if "results_error_map_ce_" in c.proto.id)
    cells = json.loads(chart.proto.spec)["data"][0]["text"]
    assert f"fixed (student repairs)</b><br>{fixed} (" in cells[1][0]  # row: teacher wrong

    # a click on the "fixed" cell lists those samples, with the true and predicted labels
    key = f"results_error_map_ce_{median.seed}"
    at.session_state[key] = {"selection": {"points": [{"customdata": [2]}]}}
    at.run()
    assert not at.exception and not at.error
    assert at.selectbox(key="results_err_cell").value == "fixed"
    samples = next(d.value for d in at.dataframe if "student" in d.value.columns)
    assert len(samples) == fixed
    assert (samples["true"] == samples["student"]).all()
    assert (samples["true"] != samples["teacher"]).all()
    pooled = next(d.value for d in at.dataframe if "cell" in d.value.columns)
    assert pooled.set_index("cell")["samples"]["fixed (student repairs)"] == (
        summary["strategies"]["ce"]["error_map"]["fixed"])

    overview = page("overview").run()
    assert not overview.exception and not overview.error
    assert "Best: train on labels alone" in [m.label for m in overview.metric]
    assert overview.info[0].value.startswith("**Do not distil:**")


# ---------------------------------------------------------------- the demo, filling in


def _demo_home(home: Path, finished: dict[str, int]) -> Path:
    """A workspace halfway through the demo: ``finished[strategy]`` seeds of each strategy done
    (crafted, the demo's own configs), every other demo run queued."""
    from kdcore.learning.strategies import DEFAULT_STRATEGIES

    store, bundle = RunStore(home), load_bundle(None)
    for seed in range(selection.DEMO_SEEDS):
        for name in DEFAULT_STRATEGIES:
            if seed < finished.get(name, 0):
                _crafted_run(store, bundle, name, seed, fix=0.1 + 0.1 * seed, breaks=0.02,
                             epochs=None)
            else:
                store.create(next(c for c in selection.demo_configs()
                                  if c.strategy == name and c.seed == seed).to_dict(),
                             queue=True)
    store.close()
    return home


@pytest.fixture
def no_job_start(monkeypatch):
    """The page starts queued jobs; here the queued runs must stay queued."""
    import kdcore.store.jobs

    monkeypatch.setattr(kdcore.store.jobs, "start_queued", lambda *a, **k: [])


def test_overview_waits_for_a_first_seed_of_every_strategy(tmp_path, monkeypatch, no_job_start):
    home = _demo_home(tmp_path / "ws", {"ce": 1, "kd": 1})
    monkeypatch.setenv("KDCORE_HOME", str(home))
    at = page("overview").run()
    assert not at.exception
    assert [s.value for s in at.subheader] == ["No finished comparison yet"]
    assert [m.label for m in at.metric] == ["Teacher accuracy on held-out data"]
    assert not at.button  # no second demo while this one runs
    progress = at.get("progress")[0].proto.text
    assert "2 of 25 runs done" in progress and "23 queued" in progress, progress


def test_overview_fills_in_with_one_seed_per_strategy(tmp_path, monkeypatch, no_job_start):
    """Every strategy has its first seed: the headline shows, says "so far", the decision
    says it cannot tell yet, and a single seed has no "± 0" spread anywhere."""
    from kdcore.learning.strategies import DEFAULT_STRATEGIES

    home = _demo_home(tmp_path / "ws", dict.fromkeys(DEFAULT_STRATEGIES, 1))
    monkeypatch.setenv("KDCORE_HOME", str(home))
    at = page("overview").run()
    assert not at.exception
    assert not at.subheader or "No finished comparison yet" not in at.subheader[0].value
    labels = [m.label for m in at.metric]
    assert any(label.startswith("Best") for label in labels), labels
    assert any("over 1 seed so far" in c.value for c in at.caption), [c.value for c in at.caption]
    assert at.info[0].value.startswith("**Cannot tell:**"), at.info[0].value
    assert "5 of 25 runs done" in at.get("progress")[0].proto.text
    best = next(m for m in at.metric if m.label.startswith("Best"))
    assert "±" not in best.proto.help and "one seed" in best.proto.help
    table = next(d.value for d in at.dataframe if "± std (pts)" in d.value.columns)
    assert table["± std (pts)"].isna().all()  # shown as "—", not "± 0"
    assert table["accuracy (mean)"].between(1, 100).all()  # percent values, "%.1f%%"


def test_results_page_one_seed_has_no_spread(tmp_path, monkeypatch, no_job_start):
    from kdcore.learning.strategies import DEFAULT_STRATEGIES

    home = _demo_home(tmp_path / "ws", dict.fromkeys(DEFAULT_STRATEGIES, 1))
    monkeypatch.setenv("KDCORE_HOME", str(home))
    at = page("results").run()
    assert not at.exception
    table = next(d.value for d in at.dataframe if "std" in d.value.columns)
    assert table["std"].isna().all()


def test_eta_from_finished_durations_and_parallel_jobs():
    from datetime import datetime, timedelta, timezone

    from kdcore.store.runs import Run

    now = datetime.now(timezone.utc)

    def run(status: str, took: float | None = None, step: int = 0, created: float = 0,
            started: float = 0) -> Run:
        """A run ``created`` / ``started`` seconds from now (negative: ago)."""
        def at(seconds: float) -> str:
            return (now + timedelta(seconds=seconds)).isoformat()

        return Run(id=status, status=status, strategy="kd", seed=0, bundle=None, config={},
                   metrics={}, error=None, created_at=at(created),
                   started_at=at(started) if status != "queued" else None,
                   finished_at=at(started + took) if took is not None else None,
                   pid=None, host=None, step=step, total_steps=10, message="")

    # durations: 15 s a run (runs finished before this queue), spread over the jobs
    done = [run("done", 10.0, created=-900, started=-900), run("done", 20.0, created=-900,
                                                                started=-880)]
    queued = [run("queued", created=-5)] * 4
    assert selection.eta_seconds(done, 2) is None  # nothing pending
    assert selection.eta_seconds(queued, 2) is None  # nothing to go by
    assert selection.eta_seconds(done + queued, 2) == pytest.approx(4 * 15 / 2)
    assert selection.eta_seconds(done + queued[:1], 8) == pytest.approx(15.0)
    # no finished run yet: the running one's pace, half trained in 10 s, so 10 s left
    half = run("running", step=5, created=-10, started=-10)
    assert selection.eta_seconds([half], 2) == pytest.approx(10.0, rel=0.05)
    # throughput: 2.5 runs trained in the 100 s since the queue began (2 done, one half), 4.5
    # runs of work left; it counts job start-up and a busy machine, which durations (10 s a
    # run) miss
    recent = [run("done", 10.0, created=-100, started=-50 + 10 * i) for i in range(2)]
    pending = [run("queued", created=-100)] * 4 + [run("running", step=5, created=-100,
                                                       started=-10)]
    eta = selection.eta_seconds(recent + pending, 2)
    assert eta == pytest.approx(4.5 * 100 / 2.5, rel=0.02)
    assert eta > (4 * 10 + 5) / 2  # the durations' estimate


def test_learning_curves_tell_strategies_apart():
    import pandas as pd

    from kdcore.learning.strategies import DEFAULT_STRATEGIES
    from kdcore.value import figures

    df = pd.DataFrame([{"strategy": n, "seed": s, "epoch": e, "test_accuracy": 0.8}
                       for n in DEFAULT_STRATEGIES for s in range(2) for e in range(3)])
    for per_seed in (False, True):
        lines = [t for t in figures.learning_curves(df, per_seed=per_seed).data
                 if t.mode == "lines" and t.showlegend is not False]
        styles = {(t.line.color, t.line.dash) for t in lines}
        dashes = {t.line.dash for t in lines}
        assert len(lines) == len(DEFAULT_STRATEGIES) == len(styles)
        assert len(dashes) == len(DEFAULT_STRATEGIES)  # apart without colour, too


def test_accuracy_bars_say_one_seed_not_plus_minus_zero():
    from kdcore.value import figures

    summary = {"teacher_test_accuracy": 0.9, "strategies": {
        "ce": {"mean": 0.88, "std": 0.01, "seeds": [0, 1]},
        "kd": {"mean": 0.91, "std": 0.0, "seeds": [0]}}}
    hover = dict(zip(*(figures.strategy_accuracy_bars(summary).data[0][k]
                       for k in ("x", "hovertext")), strict=True))
    assert hover["kd"] == "91.0%, one seed"
    assert hover["ce"] == "88.0% ± 1.0% over 2 seeds"


# ---------------------------------------------------------------- one story: ROI and Overview


@pytest.fixture
def quick_roi(monkeypatch):
    """The pages' ROI measurement with few calls (seconds, not the CLI's default), and no
    measurement kept from another test."""
    from functools import partial

    from kdcore.value import roi

    monkeypatch.setattr(roi, "roi", partial(roi.roi, repeats=20, warmup=2, throughput_repeats=2,
                                            measurements=2))
    state._roi_measurements.clear()
    yield
    state._roi_measurements.clear()


def _metric(at: AppTest, label: str):
    return next(m for m in at.metric if m.label == label)


def test_roi_page_on_the_sample_is_negligible_and_leads_with_payback(with_runs, quick_roi):
    from kdcore.learning.strategies import plain_name

    at = page("roi").run()
    assert not at.exception and not at.error
    best = selection.best_student(RunStore(with_runs).list(status="done"))
    assert any(f"{best} · {plain_name(best)}" in md.value for md in at.markdown)
    # the sample's teacher costs cents a month at the default traffic: payback leads
    assert "Serving cost is negligible at this traffic" in at.warning[0].value
    labels = [m.label for m in at.metric]
    assert labels.index("Payback, in predictions") < labels.index(
        "Teacher, per million predictions") < labels.index("Smaller (parameters)")
    payback = _metric(at, "Payback, in predictions")
    assert payback.value not in ("never", "n/a") and "95% interval" in payback.proto.delta
    assert "95% interval $" in _metric(at, "Teacher, per million predictions").proto.delta
    latency = next(d.value for d in at.dataframe if "runtime" in d.value.columns)
    assert set(latency["runtime"]) == {"torch", "ONNX Runtime"}
    assert set(latency["batch"]) == {1, 32}
    assert latency["teacher (median [95% interval])"].str.contains(r"ms \[").all()
    assert [d.proto.label for d in at.get("download_button")] == ["Download the report (HTML)"]

    # at a traffic where the teacher's bill matters, the money leads and the warning goes
    at.number_input(key="roi_requests").set_value(10**12).run()
    assert not at.exception and not at.error and not at.warning
    labels = [m.label for m in at.metric]
    assert labels[0] == "Teacher, per million predictions"
    assert labels.index("Saving, a month") < labels.index("Payback, in predictions")
    assert "95% interval $" in _metric(at, "Saving, a month").proto.delta


def test_overview_measures_on_request_and_tells_the_roi_pages_story(with_runs, quick_roi):
    at = page("overview").run()
    assert not at.exception and not at.error
    table = next(d.value for d in at.dataframe if "best student" in d.value.columns)
    rows = table.set_index("")
    assert rows.loc["latency per request (median, batch 1)", "teacher"] == "not measured yet"
    at.button(key="overview_measure").click().run()
    assert not at.exception and not at.error
    rows = next(d.value for d in at.dataframe if "best student" in d.value.columns).set_index("")
    assert rows.loc["latency per request (median, batch 1)", "best student"].endswith("]")
    assert rows.loc["cost per million predictions", "teacher"].startswith("$")
    assert "on disk" in rows.loc["size on disk", "student vs teacher"]
    best = selection.best_student(RunStore(with_runs).list(status="done"))
    assert state.strategy_label(best) in [c.value for c in at.caption]
    assert "Measure latency and cost" not in [b.label for b in at.button]

    # the ROI page prices the same run, from the same measurement, and "smaller" is the same
    roi_page = page("roi").run()
    assert not roi_page.exception and not roi_page.error
    measured_run = next(c.value for c in at.caption if c.value.startswith("Student: run `"))
    run_id = measured_run.split("`")[1]
    assert any(f"run `{run_id}`" in c.value for c in roi_page.caption)
    smaller = _metric(roi_page, "Smaller (parameters)").value  # "125×"
    assert rows.loc["size (parameters)", "student vs teacher"] == (
        smaller.replace("×", "x") + " smaller")
    assert _metric(at, "Student size (parameters)").value == smaller.replace("×", "× smaller")


def served_downloads(monkeypatch) -> dict:
    """Keeps what each download button would serve (its ``data``), by key."""
    served = {}
    real = st.download_button

    def keep(label, data=None, **kwargs):
        served[kwargs.get("key")] = data
        return real(label, data=data, **kwargs)

    monkeypatch.setattr(st, "download_button", keep)
    return served


def test_roi_download_is_the_report_of_the_pages_measurement_and_assumptions(
        with_runs, quick_roi, monkeypatch):
    served = served_downloads(monkeypatch)
    at = page("roi").run()
    at.number_input(key="roi_requests").set_value(20_000_000)
    at.number_input(key="roi_price").set_value(2.5).run()
    assert not at.exception and not at.error
    html = served["roi_download"]().decode("utf-8")
    assert "could not be built" not in html
    assert "20,000,000" in html and "$2.50" in html and "10,000,000" not in html
    latency = next(d.value for d in at.dataframe if "runtime" in d.value.columns)
    torch_ms = latency["teacher (median [95% interval])"].iloc[0].split(" [")[0]  # "0.184 ms"
    assert torch_ms in html  # the page's own measurement, not a new one
    run_id = next(c.value for c in at.caption if c.value.startswith("Measured student: run `")
                  ).split("`")[1]
    assert f"<code>{run_id}</code>" in html


def test_cost_per_million_bars_show_each_interval_and_the_saving():
    from kdcore.value import figures

    per_million = {"teacher": {"median": 0.02, "ci95": [0.015, 0.03]},
                   "student": {"median": 0.005, "ci95": [0.004, 0.007]},
                   "saving": {"median": 0.015, "ci95": [0.01, 0.024]}}
    fig = figures.cost_per_million_bars(per_million, "kd+be+br")
    bars, labels = fig.data
    assert list(bars.marker.color) == [figures.TEACHER, figures.STUDENT]
    assert list(bars.error_y.array) == pytest.approx([0.01, 0.002])  # up to each high end
    assert list(bars.error_y.arrayminus) == pytest.approx([0.005, 0.001])
    assert list(labels.text) == ["$0.02", "$0.005"] and list(labels.y) == [0.03, 0.007]
    assert "saving $0.015" in fig.layout.title.text
    size = figures.roi_scatter(pd.DataFrame([
        {"model": "teacher", "kind": "teacher", "accuracy": 0.9, "accuracy_std": 0.0, "seeds": 0,
         "params": 300_000},
        {"model": "kd", "kind": "student", "accuracy": 0.92, "accuracy_std": 0.01, "seeds": 2,
         "params": 2_400}]), "params", "kd")
    assert size.layout.xaxis.title.text.startswith("size: parameters")
    assert "100k" in size.layout.xaxis.ticktext and "1k" in size.layout.xaxis.ticktext


def test_overview_follows_the_roi_pages_assumptions(with_runs, quick_roi, monkeypatch):
    """Assumptions entered on the ROI page price the Overview's payback and its report too."""
    from kdcore.value.roi import CostAssumptions

    served = served_downloads(monkeypatch)
    at = page("overview").run()
    at.button(key="overview_measure").click().run()
    assert "$0.10 per machine-hour" in next(c.value for c in at.caption
                                            if c.value.startswith("Student: run `"))
    at.session_state[state.ROI_ASSUMPTIONS] = CostAssumptions(
        requests_per_month=20_000_000, cost_per_hour=2.5, utilisation=0.5)
    at.run()
    assert not at.exception and not at.error
    assert "$2.50 per machine-hour" in next(c.value for c in at.caption
                                            if c.value.startswith("Student: run `"))
    html = served["overview_download_report"]().decode("utf-8")
    assert "20,000,000" in html and "$2.50" in html
