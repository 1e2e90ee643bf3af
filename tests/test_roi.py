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
    cost_model,
    measure_models,
    monthly_cost,
    serialized_size,
    time_alternately,
    torch_threads,
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
    assert got["measurement"]["throughput_batch"] == 256


# --------------------------------------------------------------------------- runs and the CLI


def test_roi_document_from_a_store(trained):
    ws, runs = trained
    doc = roi_mod.roi(RunStore(ws), repeats=100, warmup=10, throughput_repeats=5)
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
    # the cost is the model applied to the measured latency
    expected = cost_model(doc["teacher"]["latency_ms_p50"], doc["student"]["latency_ms_p50"])
    assert doc["cost"]["saving_monthly"] == pytest.approx(expected["saving_monthly"])
    assert doc["summary"].count(". ") >= 1 and "kd+be+br+dl" in doc["summary"]
    # new assumptions recompute cost and summary, not the measurement
    again = roi_mod.with_assumptions(doc, CostAssumptions(requests_per_month=1e9))
    assert again["teacher"] is doc["teacher"]
    assert again["cost"]["teacher_monthly"] == pytest.approx(doc["cost"]["teacher_monthly"] * 100)
    assert "1,000,000,000 requests" in again["summary"]


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
    code = main(["roi", "--workspace", str(ws), "--json", "--repeats", "100",
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
    assert at.selectbox(key="roi_student").value == "kd+be+br+dl"
    summary = at.info[0].value
    assert "kd+be+br+dl student" in summary and "10,000,000 requests" in summary
    assert [m.label for m in at.metric] == ["Smaller (bytes on disk)", "Faster per request",
                                            "Accuracy change", "Saving a month"]
    assert len(at.get("plotly_chart")) == 3
    at.number_input(key="roi_requests").set_value(20_000_000).run()
    assert "20,000,000 requests" in at.info[0].value
    at.selectbox(key="roi_student").set_value("kd").run()
    assert not at.exception and "The kd student" in at.info[0].value


def test_roi_page_empty_store(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path / "ws"))
    at = _page("roi", monkeypatch).run()
    assert not at.exception
    assert "No students were trained yet" in at.info[0].value

