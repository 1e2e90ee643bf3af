"""ROI: the cost arithmetic by hand, timing that is really measured, and `kdcore roi`."""

from __future__ import annotations

import io
import json
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from kdcore.cli import main
from kdcore.data.bundles import load_bundle
from kdcore.errors import DataError
from kdcore.learning.models import build_model
from kdcore.learning.teachers import load_teacher
from kdcore.store import selection
from kdcore.store.runs import RunStore
from kdcore.value import roi as roi_mod
from kdcore.value.formatting import format_money
from kdcore.value.roi import (
    CostAssumptions,
    ci95,
    cost_model,
    cost_per_million,
    measure_models,
    monthly_cost,
    payback,
    serialized_size,
    time_alternately,
    torch_threads,
    training_cost,
)

# --------------------------------------------------------------------------- cost arithmetic


def test_monthly_cost_by_hand():
    # 10M requests x 2 ms = 20,000 busy seconds; at 50% utilisation 40,000 billed seconds
    # = 11.111 hours; at $0.10 an hour $1.1111.
    a = CostAssumptions(requests_per_month=10_000_000, cost_per_hour=0.10, utilisation=0.5)
    got = monthly_cost(2.0, a)
    assert got["machine_hours"] == pytest.approx(40_000 / 3600)
    assert got["monthly"] == pytest.approx(1.111111, rel=1e-6)
    # 1M requests x 100 ms = 100,000 s = 27.78 h, fully used, $3/h -> $83.33
    b = CostAssumptions(requests_per_month=1_000_000, cost_per_hour=3.0, utilisation=1.0)
    assert monthly_cost(100.0, b)["monthly"] == pytest.approx(83.3333, rel=1e-5)


def test_cost_model_saving_by_hand():
    a = CostAssumptions(requests_per_month=10_000_000, cost_per_hour=0.10, utilisation=0.5)
    cost = cost_model(2.0, 0.5, a)
    assert cost["teacher_monthly"] == pytest.approx(1.111111, rel=1e-6)
    assert cost["student_monthly"] == pytest.approx(0.277778, rel=1e-5)
    assert cost["saving_monthly"] == pytest.approx(0.833333, rel=1e-5)
    assert cost["saving_share"] == pytest.approx(0.75)
    assumptions = cost["assumptions"]
    assert assumptions["requests_per_month"] == 10_000_000
    assert assumptions["cost_per_hour"] == 0.10
    assert assumptions["utilisation"] == 0.5
    assert "utilisation" in assumptions["model"] and "p50" in assumptions["model"]


def test_cost_model_zero_traffic_and_slower_student():
    cost = cost_model(2.0, 0.5, CostAssumptions(requests_per_month=0))
    assert cost["teacher_monthly"] == cost["student_monthly"] == cost["saving_monthly"] == 0
    assert cost["saving_share"] is None
    worse = cost_model(1.0, 3.0, CostAssumptions(requests_per_month=3600 * 1000,
                                                 cost_per_hour=1.0, utilisation=1.0))
    # 3.6M requests x 1 ms = 1 hour; x 3 ms = 3 hours: the student costs $2 more
    assert worse["teacher_monthly"] == pytest.approx(1.0)
    assert worse["saving_monthly"] == pytest.approx(-2.0)


def test_money_carries_the_interval_of_the_measurements_through():
    # three measurements: the teacher took 2, 3, 4 ms; the student 1, 1, 3 ms (paired)
    a = CostAssumptions(requests_per_month=3_600_000, cost_per_hour=1.0, utilisation=1.0)
    cost = cost_model([2.0, 3.0, 4.0], [1.0, 1.0, 3.0], a)
    # 3.6M requests x 1 ms = 1 hour = $1: dollars a month equal the milliseconds
    assert cost["teacher_monthly"] == pytest.approx(3.0)
    assert cost["teacher_monthly_ci95"] == pytest.approx(ci95([2.0, 3.0, 4.0]))
    assert cost["teacher_monthly_ci95"] == pytest.approx([2.05, 3.95])  # linear percentiles
    assert cost["student_monthly"] == pytest.approx(1.0)
    # the saving is paired within each measurement: 1, 2, 1 -> median 1, not 3 - 1
    assert cost["saving_monthly"] == pytest.approx(1.0)
    assert cost["saving_monthly_ci95"] == pytest.approx(ci95([1.0, 2.0, 1.0]))
    assert cost["saving_monthly_ci95"][0] <= cost["saving_monthly"] <= \
        cost["saving_monthly_ci95"][1]
    assert "median of 3 measurement(s)" in cost["assumptions"]["latency"]
    one = cost_model(2.0, 0.5, a)  # one measurement: a point, and its interval is the point
    assert one["teacher_monthly_ci95"] == [one["teacher_monthly"]] * 2


def test_cost_per_million_agrees_with_the_monthly_cost():
    a = CostAssumptions(requests_per_month=25_000_000, cost_per_hour=0.4, utilisation=0.8)
    t, s = [2.0, 2.5, 2.2, 2.1, 2.4], [0.5, 0.6, 0.4, 0.5, 0.7]
    per = cost_per_million(t, s, a)
    cost = cost_model(t, s, a)
    scale = a.requests_per_month / 1_000_000
    for side in ("teacher", "student", "saving"):
        assert per[side]["median"] * scale == pytest.approx(cost[f"{side}_monthly"])
        assert np.array(per[side]["ci95"]) * scale == pytest.approx(cost[f"{side}_monthly_ci95"])
    # by hand: 1M requests x 2.2 ms / 0.8 = 2750 s = 0.7639 h x $0.40 = $0.30556
    assert per["teacher"]["median"] == pytest.approx(0.305556, rel=1e-5)


def test_payback_by_hand_and_when_nothing_is_saved():
    a = CostAssumptions(cost_per_hour=3.6)  # $0.001 a second
    made = training_cost([40.0, 60.0], a)
    assert made == {"seconds": 100.0, "dollars": pytest.approx(0.1), "runs": 2}
    # $2 saved per million predictions = $2e-6 a prediction: $0.10 back after 50,000
    got = payback(made["dollars"], {"median": 2.0, "ci95": [1.0, 4.0]})
    assert got["median"] == pytest.approx(50_000)
    assert got["ci95"] == pytest.approx([25_000, 100_000])  # more saving, sooner back
    assert got["reason"] is None
    open_ended = payback(0.1, {"median": 2.0, "ci95": [-1.0, 4.0]})
    assert open_ended["ci95"][0] == pytest.approx(25_000) and open_ended["ci95"][1] is None
    never = payback(0.1, {"median": -0.5, "ci95": [-1.0, 0.2]})
    assert never["median"] is None and never["ci95"] == [None, None]
    assert "never repays" in never["reason"]


@pytest.mark.parametrize("kwargs", [
    {"utilisation": 0}, {"utilisation": 1.5}, {"utilisation": -0.1},
    {"cost_per_hour": -1}, {"requests_per_month": -5}, {"requests_per_month": math.nan},
])
def test_bad_assumptions_name_the_field(kwargs):
    with pytest.raises(DataError, match=next(iter(kwargs))):
        CostAssumptions(**kwargs)


def test_format_money():
    assert format_money(1234.5) == "$1,234"
    assert format_money(12.345) == "$12.35"
    assert format_money(0.10) == "$0.10"
    assert format_money(0.031234) == "$0.0312"
    assert format_money(-2) == "-$2.00"
    assert format_money(1.7e-05) == "$0.000017"  # never 1.7e-05


# --------------------------------------------------------------------------- measuring


def test_serialized_size_is_the_bytes_of_torch_save():
    model = build_model({"type": "mlp", "input_dim": 64, "hidden": [32], "n_classes": 10})
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert serialized_size(model) == len(buffer.getvalue())
    big = build_model({"type": "mlp", "input_dim": 64, "hidden": [512], "n_classes": 10})
    assert serialized_size(big) > 10 * serialized_size(model)


def test_thread_count_is_set_and_restored():
    before = torch.get_num_threads()
    with torch_threads(1) as used:
        assert used == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(DataError):
        with torch_threads(0):
            pass


class Sleeper(nn.Module):
    """A model that takes at least `ms` milliseconds per call: a timing that is real."""

    def __init__(self, ms: float) -> None:
        super().__init__()
        self.ms = ms
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        time.sleep(self.ms / 1000)
        return self.linear(x)


def test_latency_comes_from_real_timing():
    x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    got = measure_models({"slow": Sleeper(3.0), "fast": Sleeper(0.0)}, x, repeats=15,
                         warmup=2, throughput_repeats=3)
    slow, fast = got["slow"], got["fast"]
    assert slow["latency_ms_p50"] >= 3.0  # sleep() guarantees at least this much
    assert fast["latency_ms_p50"] < slow["latency_ms_p50"]
    samples = np.array(fast["latency_samples_ms"])
    assert len(samples) == 15 and (samples > 0).all()
    assert len(set(samples.tolist())) > 1  # measured, not a constant
    assert slow["latency_ms_p95"] >= slow["latency_ms_p50"]
    assert got["measurement"]["threads"] == 1


def test_time_alternately_calls_each_function_the_right_number_of_times():
    counts = {"a": 0, "b": 0}

    def bump(name):
        counts[name] += 1

    samples = time_alternately({"a": lambda: bump("a"), "b": lambda: bump("b")},
                               repeats=7, warmup=3)
    assert counts == {"a": 10, "b": 10}
    assert samples["a"].shape == (7,) and (samples["a"] > 0).all()


def test_teacher_is_bigger_and_slower_than_student_in_the_same_process():
    bundle = load_bundle(None)
    teacher = load_teacher(bundle)
    student = build_model(bundle.student_spec)
    got = measure_models({"teacher": teacher, "student": student}, bundle.x("test"),
                         repeats=150, warmup=20, throughput_repeats=10)
    t, s = got["teacher"], got["student"]
    assert t["params"] > 50 * s["params"]
    assert t["size_bytes"] > 50 * s["size_bytes"]
    assert t["latency_ms_p50"] > s["latency_ms_p50"] > 0
    assert s["throughput_per_s"] > t["throughput_per_s"] > 0
    assert got["measurement"]["throughput_batch"] == roi_mod.DEFAULT_SERVING_BATCH


# --------------------------------------------------------------------------- runs and the CLI


def test_roi_document_from_a_store(trained):
    ws, runs = trained
    doc = roi_mod.roi(RunStore(ws), repeats=60, warmup=10, throughput_repeats=5, measurements=3)
    assert doc["strategy"] == "kd+be+br+dl"
    aware = [r for r in runs if r.strategy == "kd+be+br+dl"]
    assert doc["run_id"] in {r.id for r in aware}
    accs = [r.metrics["test_accuracy"] for r in aware]
    assert doc["student"]["accuracy"] == pytest.approx(np.mean(accs))
    assert doc["student"]["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert doc["student"]["seeds"] == [0, 1]
    assert doc["teacher"]["accuracy"] == pytest.approx(aware[0].metrics["teacher_test_accuracy"])
    assert doc["teacher"]["params"] == aware[0].metrics["teacher_params"]
    assert doc["student"]["params"] == aware[0].metrics["student_params"]
    assert doc["speedup"] == pytest.approx(doc["teacher"]["latency_ms_p50"]
                                           / doc["student"]["latency_ms_p50"])
    assert doc["accuracy_change"] == pytest.approx(doc["student"]["accuracy"]
                                                   - doc["teacher"]["accuracy"])
    # the cost is the model applied to the latency measured each time
    t_runs = doc["teacher"]["per_measurement"]["latency_ms_p50"]
    s_runs = doc["student"]["per_measurement"]["latency_ms_p50"]
    assert len(t_runs) == len(s_runs) == 3
    assert doc["teacher"]["latency_ms_p50"] == pytest.approx(np.median(t_runs))
    expected = cost_model(t_runs, s_runs)
    assert doc["cost"]["saving_monthly"] == pytest.approx(expected["saving_monthly"])
    assert doc["cost"]["teacher_monthly"] == pytest.approx(
        monthly_cost(np.median(t_runs), CostAssumptions())["monthly"])
    assert doc["summary"].count(". ") >= 1 and "kd+be+br+dl" in doc["summary"]
    # new assumptions recompute cost and summary, not the measurement
    again = roi_mod.with_assumptions(doc, CostAssumptions(requests_per_month=1e9))
    assert again["teacher"] is doc["teacher"]
    assert again["cost"]["teacher_monthly"] == pytest.approx(doc["cost"]["teacher_monthly"] * 100)
    assert "1,000,000,000 requests" in again["summary"]


def _within(figure: dict) -> bool:
    low, high = figure["ci95"]
    return low <= figure["median"] <= high


def test_roi_prices_the_one_best_student_of_the_selection(trained, monkeypatch):
    ws, _ = trained
    store = RunStore(ws)
    comparison = next(iter(selection.comparable_groups(store.list()).values()))
    run, group, _ = roi_mod.pick_student(store)
    assert run.strategy == selection.best_student(comparison) == "kd+be+br+dl"
    assert {r.strategy for r in group} == {run.strategy} and len(group) == 2
    # whatever best_student decides (ce and kd included) is what ROI prices
    monkeypatch.setattr(selection, "best_student", lambda runs: "kd")
    run, group, _ = roi_mod.pick_student(store)
    assert run.strategy == "kd" and [r.seed for r in group] == [0, 1]


def test_image_runs_load_their_models_through_the_image_trainer(workspace, monkeypatch):
    """An image run (``student_arch`` in its config) gets its teacher, student skeleton and test
    images from kdcore.learning.image_train.load_run_models, the trained weights from its
    student.pt, and a torch teacher unwrapped from its frozen wrapper."""
    from torch import nn

    from kdcore.learning import image_train

    store = RunStore(workspace)
    config = {"strategy": "kd", "seed": 0, "bundle": "imgs", "student_arch": "cnn"}
    run_id = store.create(config, status="done")
    torch.manual_seed(1)
    trained = nn.Linear(4, 3)
    torch.save(trained.state_dict(), store.artifact_dir(run_id) / "student.pt")
    inner = nn.Linear(4, 3)

    class Wrapped(nn.Module):  # as image_train.Teacher holds a torch teacher
        def __init__(self):
            super().__init__()
            self.model, self.predictor = inner, None

    seen = []

    def load_run_models(cfg):
        seen.append(cfg)
        return Wrapped(), nn.Linear(4, 3), np.zeros((5, 4), np.float32)

    monkeypatch.setattr(image_train, "load_run_models", load_run_models)
    teacher, student, x = roi_mod.models_for(store.get(run_id), store)
    assert seen[0]["student_arch"] == "cnn"
    assert teacher is inner and x.shape == (5, 4) and not student.training
    assert torch.equal(student.weight, trained.weight)


def test_roi_of_an_image_run(tmp_path):
    """A real image run (kdcore.learning.image_train), one epoch on a tiny folder: ROI measures
    its own architectures on its own test images, in torch and ONNX Runtime."""
    from PIL import Image

    from kdcore.learning.config import TrainConfig
    from kdcore.store.jobs import execute_run

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in "abc":
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                                "RGB").save(root / split / c / f"{i}.png")
    torch.manual_seed(0)
    teacher = build_model({"type": "cnn", "in_channels": 3, "n_classes": 3})
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    config = TrainConfig.for_images(root, student_arch="cnn", teacher_arch="cnn",
                                    teacher_weights=str(tmp_path / "teacher.pt"),
                                    strategy="kd", epochs=1, batch_size=6)
    store = RunStore(tmp_path / "ws")
    run_id = store.create(config.to_dict())
    threads = torch.get_num_threads()
    try:
        execute_run(run_id, workspace=store.workspace)
    finally:
        torch.set_num_threads(threads)  # execute_run pins one thread
    doc = roi_mod.roi(store, None, run_id, repeats=5, warmup=1, throughput_repeats=2,
                      measurements=2)
    assert doc["run_id"] == run_id and doc["bundle"] == "imgs"
    assert doc["student"]["architecture"] == {"type": "cnn"}
    assert doc["teacher"]["params"] == sum(p.numel() for p in teacher.parameters())
    assert doc["onnx"]["student"]["latency_ms_p50"] > 0
    assert doc["teacher"]["accuracy"] == store.get(run_id).metrics["teacher_test_accuracy"]
    # the folder alone: its best student is found as on a bundle (kdcore roi IMAGES)
    by_folder = roi_mod.roi(store, root, repeats=5, warmup=1, throughput_repeats=2,
                            measurements=2)
    assert by_folder["run_id"] == run_id
    with pytest.raises(DataError, match="no finished student on"):
        roi_mod.roi(RunStore(tmp_path / "empty"), root, measurements=2)


def test_the_document_adds_onnx_intervals_cost_per_million_and_payback(trained):
    ws, runs = trained
    doc = roi_mod.roi(RunStore(ws), repeats=40, warmup=5, throughput_repeats=4, measurements=3,
                      serving_batch=16)
    keys = ("latency_ms_p50", "latency_ms_p95", "throughput_per_s", "batch_ms_p50",
            "batch_ms_p95")
    for figures in (doc["teacher"], doc["student"], doc["onnx"]["teacher"],
                    doc["onnx"]["student"]):
        for key in keys:
            low, high = figures[f"{key}_ci95"]
            assert low <= figures[key] <= high and figures[key] > 0, key
            assert len(figures["per_measurement"][key]) == 3
    assert doc["onnx"]["teacher"]["params"] == doc["teacher"]["params"]
    assert doc["onnx"]["teacher"]["size_bytes"] > 50 * doc["onnx"]["student"]["size_bytes"]
    assert doc["measurements"] == {"count": 3, "calls_each": 40, "serving_calls_each": 4,
                                   "serving_batch": 16}
    assert doc["measurement"]["throughput_batch"] == 16
    cost, per = doc["cost"], doc["cost_per_million"]
    for side in ("teacher", "student", "saving"):
        assert _within(per[side])
        assert per[side]["median"] * 10 == pytest.approx(cost[f"{side}_monthly"])  # 10M a month
        assert _within({"median": cost[f"{side}_monthly"], "ci95": cost[f"{side}_monthly_ci95"]})
    # what the student cost to make: both seeds of its recipe, at the machine's price
    aware = [r for r in runs if r.strategy == doc["strategy"]]
    seconds = sum(r.metrics["train_seconds"] for r in aware)
    made = doc["student_training_cost"]
    assert made["seconds"] == pytest.approx(seconds) and made["runs"] == 2
    assert made["dollars"] == pytest.approx(seconds * 0.10 / 3600)
    back = doc["payback_predictions"]
    if per["saving"]["median"] > 0:
        assert back["median"] == pytest.approx(made["dollars"]
                                               / (per["saving"]["median"] / 1_000_000))
        assert back["ci95"][0] <= back["median"]
    else:
        assert back["median"] is None and back["reason"]
    # the sample's teacher costs cents a month: negligible, and the summary leads with payback
    assert doc["negligible"] is (cost["teacher_monthly"] < 1) is True
    summary = doc["summary"]
    assert "Serving cost is negligible at this traffic" in summary
    assert summary.index("Training the student cost") < summary.index("Serving a million")
    busy = roi_mod.with_assumptions(doc, CostAssumptions(requests_per_month=1e12))
    assert busy["negligible"] is False and "negligible" not in busy["summary"]
    assert busy["summary"].index("Serving a million") < busy["summary"].index(
        "requests a month")
    assert busy["payback_predictions"] == back  # the payback does not depend on traffic


def test_summary_says_smaller_in_parameters_and_names_the_strategy(trained):
    from kdcore.learning.strategies import plain_name

    ws, _ = trained
    doc = roi_mod.roi(RunStore(ws), repeats=10, warmup=2, throughput_repeats=2, measurements=1)
    ratio = doc["teacher"]["params"] / doc["student"]["params"]
    summary = doc["summary"]
    assert f"{ratio:,.1f}x smaller (parameters: {doc['student']['params']:,}" in summary
    assert "on disk)" in summary
    assert f"The kd+be+br+dl student ({plain_name('kd+be+br+dl')})" in summary
    table = roi_mod.roi_table(doc).set_index("measure")
    assert "smaller" in table.loc["parameters", "student vs teacher"]
    assert "smaller" not in table.loc["bytes on disk (serialized size)", "student vs teacher"]


def test_the_report_takes_the_pages_measurement_and_assumptions(trained, monkeypatch):
    from kdcore.value import report

    ws, _ = trained
    store = RunStore(ws)
    doc = roi_mod.roi(store, repeats=10, warmup=2, throughput_repeats=2, measurements=2)
    chosen = CostAssumptions(requests_per_month=3e9, cost_per_hour=2.5, utilisation=0.9)

    def measure_again(*args, **kwargs):
        raise AssertionError("the report measured again instead of taking the page's document")

    monkeypatch.setattr(report, "roi", measure_again)
    data = report.build_report(store, roi_doc=doc, assumptions=chosen)
    assert data.roi["run_id"] == doc["run_id"]
    assert data.roi["teacher"] is doc["teacher"]  # the same measurement, re-priced
    assert data.roi["cost"]["assumptions"]["requests_per_month"] == 3e9
    assert data.roi["cost"] == roi_mod.with_assumptions(doc, chosen)["cost"]
    assert "3,000,000,000 requests" in data.roi["summary"]
    kept = report.build_report(store, roi_doc=roi_mod.with_assumptions(doc, chosen))
    assert kept.roi["cost"]["assumptions"]["cost_per_hour"] == 2.5  # as the page priced it


def test_strategy_points_cover_teacher_and_every_strategy(trained):
    ws, _ = trained
    store = RunStore(ws)
    doc = roi_mod.roi(store, repeats=20, warmup=2, throughput_repeats=2)
    comparison = next(iter(selection.comparable_groups(store.list()).values()))
    points = roi_mod.strategy_points(doc, comparison)
    assert list(points["model"]) == ["teacher", "kd", "kd+be+br+dl"]
    assert (points.loc[points["kind"] == "student", "size_bytes"]
            == doc["student"]["size_bytes"]).all()


def test_cli_roi_json(trained, capsys):
    ws, _ = trained
    code = main(["roi", "--workspace", str(ws), "--json", "--repeats", "50",
                 "--measurements", "2", "--serving-batch", "8",
                 "--requests-per-month", "2000000", "--cost-per-hour", "1.5",
                 "--utilisation", "0.25"])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    for side in ("teacher", "student"):
        for key in ("params", "size_bytes", "latency_ms_p50", "latency_ms_p95",
                    "throughput_per_s", "accuracy"):
            assert isinstance(doc[side][key], (int, float)), (side, key)
        assert "latency_samples_ms" not in doc[side]
    for side in ("teacher", "student"):
        onnx = doc["onnx"][side]
        for key in ("latency_ms_p50", "latency_ms_p95", "throughput_per_s", "batch_ms_p50"):
            assert isinstance(onnx[key], float) and len(onnx[f"{key}_ci95"]) == 2, (side, key)
        assert "latency_samples_ms" not in onnx
    assert doc["measurements"]["count"] == 2 and doc["measurements"]["calls_each"] == 50
    assert doc["measurements"]["serving_batch"] == 8
    for side in ("teacher", "student", "saving"):
        assert set(doc["cost_per_million"][side]) == {"median", "ci95"}
    assert set(doc["payback_predictions"]) >= {"median", "ci95"}
    assert isinstance(doc["negligible"], bool)
    assert set(doc["student_training_cost"]) >= {"seconds", "dollars"}
    for key in ("speedup", "size_ratio", "accuracy_change"):
        assert isinstance(doc[key], float)
    cost = doc["cost"]
    assert set(cost) >= {"assumptions", "teacher_monthly", "student_monthly", "saving_monthly"}
    assert cost["assumptions"]["requests_per_month"] == 2_000_000
    assert cost["assumptions"]["cost_per_hour"] == 1.5
    assert cost["assumptions"]["utilisation"] == 0.25
    hours = 2_000_000 * doc["teacher"]["latency_ms_p50"] / 1000 / 0.25 / 3600
    assert cost["teacher_monthly"] == pytest.approx(hours * 1.5)
    assert doc["teacher"]["params"] > doc["student"]["params"]
    assert doc["teacher"]["size_bytes"] > doc["student"]["size_bytes"]
    assert doc["teacher"]["latency_ms_p50"] > doc["student"]["latency_ms_p50"]


def test_cli_roi_table_and_explicit_run(trained, capsys):
    ws, runs = trained
    kd = next(r for r in runs if r.strategy == "kd")
    assert main(["roi", "--workspace", str(ws), "--run", kd.id, "--repeats", "30"]) == 0
    out = capsys.readouterr().out
    assert f"run {kd.id} (kd)" in out
    assert "serialized size" in out and "Assumptions: 10,000,000 requests" in out
    assert "ONNX Runtime" in out and "cost per million predictions" in out
    assert "5 measurements of 30 calls" in out


def test_cli_roi_without_a_student(tmp_path, capsys):
    code = main(["roi", "--workspace", str(tmp_path / "empty"), "--json"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "no finished student" in captured.err and "kdcore demo" in captured.err


def test_cli_roi_bad_assumption(trained, capsys):
    ws, _ = trained
    code = main(["roi", "--workspace", str(ws), "--utilisation", "0"])
    assert code == 2
    assert "utilisation" in capsys.readouterr().err


# --------------------------------------------------------------------------- the ROI page


def _page(name: str, monkeypatch):
    import sys
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    # AppTest leaves the page script as __main__; spawned training workers in later tests
    # would re-run it, so put the real one back afterwards
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    root = Path(__file__).resolve().parents[1]
    return AppTest.from_file(str(root / "dashboard" / "app_pages" / f"{name}.py"),
                             default_timeout=60)


def test_roi_page(trained, monkeypatch):
    ws, _ = trained
    monkeypatch.setenv("KDCORE_HOME", str(ws))
    at = _page("roi", monkeypatch).run()
    assert not at.exception, at.exception
    # the one best student is priced, no other to pick
    assert any("Priced student: kd+be+br+dl" in md.value for md in at.markdown)
    assert not at.selectbox
    summary = at.info[0].value
    assert "kd+be+br+dl student" in summary and "10,000,000 requests" in summary
    labels = [m.label for m in at.metric]
    assert "Smaller (parameters)" in labels and "On disk" in labels
    assert len(at.get("plotly_chart")) == 3
    at.number_input(key="roi_requests").set_value(20_000_000).run()
    assert not at.exception and "20,000,000 requests" in at.info[0].value


def test_roi_page_empty_store(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path / "ws"))
    at = _page("roi", monkeypatch).run()
    assert not at.exception
    assert "No students were trained yet" in at.info[0].value



def test_a_slow_model_gets_fewer_calls_within_the_budget():
    """A model whose calls would overrun the time budget is timed with fewer calls (never fewer
    than MIN_CALLS), and the document says how many; a fast one keeps every call."""
    import time as clock

    class Slow(torch.nn.Module):
        def forward(self, x):
            clock.sleep(0.01)
            return x

    class Fast(torch.nn.Module):
        def forward(self, x):
            return x

    x = np.zeros((4, 3), dtype=np.float32)
    slow = roi_mod.measure_models({"teacher": Slow(), "student": Fast()}, x, repeats=100,
                                  warmup=10, throughput_repeats=20, measurements=1,
                                  budget_s=0.2)
    m = slow["measurement"]
    assert roi_mod.MIN_CALLS <= m["latency_calls"] < 100
    assert roi_mod.MIN_CALLS <= m["throughput_calls"] < 20
    assert len(slow["teacher"]["latency_samples_ms"]) == m["latency_calls"]
    fast = roi_mod.measure_models({"teacher": Fast(), "student": Fast()}, x, repeats=50,
                                  warmup=5, throughput_repeats=10, measurements=1, budget_s=5.0)
    assert fast["measurement"]["latency_calls"] == 50
    assert fast["measurement"]["throughput_calls"] == 10
