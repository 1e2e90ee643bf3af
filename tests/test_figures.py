"""kdcore.value.figures: pure figures, one palette, the same colours in the app and the report."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from kdcore.analysis.analyzer import report, select
from kdcore.analysis.bias import reliability
from kdcore.data.sources import load_predictions
from kdcore.store.runs import RunStore
from kdcore.value import figures
from kdcore.value.report import build_report

ROOT = Path(__file__).resolve().parents[1]


def test_charts_are_pure_figures():
    rep = report(select(load_predictions(None), "test"))
    k = len(rep.class_names)
    drawn = [
        figures.bias_rate_bars(rep.per_class),
        figures.error_confusion_heatmap(rep.error_confusion, rep.class_names, normalise=True),
        figures.error_confusion_heatmap(np.zeros((k, k), int), rep.class_names),
        figures.top_confusions_bar(rep.top_confusions),
        figures.confidence_histogram(rep.confidence, rep.wrong),
        figures.reliability_diagram(reliability(rep.confidence, ~rep.wrong)),
        figures.probability_bars(rep.class_names, np.full(k, 1 / k), np.full(k, 1 / k),
                                 true_class=1),
        figures.image_grid(np.zeros((3, 8, 8)), ["a", "b", "c"]),
        figures.per_class_before_after(pd.DataFrame({"class": rep.class_names,
                                                     "teacher": rep.per_class.teacher_accuracy,
                                                     "kd": rep.per_class.teacher_accuracy})),
    ]
    assert all(isinstance(f, figures.Figure) and f.layout.title.text is not None
               for f in drawn[:7])
    assert "streamlit" not in Path(figures.__file__).read_text()


def test_teacher_bias_figures_are_what_plotlys_validator_makes_of_them():
    """They are built as plain dicts without Plotly's checks (fast first render): each must
    be valid and already in the form the validator gives (a colour scale named "Reds" or a
    title as a bare string would be rewritten, and plotly.js would draw something else)."""
    rep = report(select(load_predictions(None), "test"))
    k = len(rep.class_names)
    split = rep.per_class.assign(teacher_bias_rate=rep.per_class.bias_rate * 0.6,
                                 label_error_rate=rep.per_class.bias_rate * 0.4)
    for fig in (figures.bias_rate_bars(rep.per_class), figures.bias_rate_bars(split),
                figures.error_confusion_heatmap(rep.error_confusion, rep.class_names),
                figures.error_confusion_heatmap(rep.error_confusion, rep.class_names, True),
                figures.top_confusions_bar(rep.top_confusions),
                figures.confidence_histogram(rep.confidence, rep.wrong),
                figures.reliability_diagram(reliability(rep.confidence, ~rep.wrong)),
                figures.probability_bars(rep.class_names, np.full(k, 1 / k), np.full(k, 1 / k),
                                         true_class=1, title="t")):
        spec = json.loads(fig.to_json())
        assert json.loads(figures.go.Figure(spec).to_json()) == spec, fig.layout.title.text


def test_roi_charts():
    points = pd.DataFrame([
        {"model": "teacher", "kind": "teacher", "accuracy": 0.89, "accuracy_std": 0.0,
         "seeds": 0, "size_bytes": 1.2e6, "latency_ms_p50": 0.05},
        {"model": "kd", "kind": "student", "accuracy": 0.91, "accuracy_std": 0.01,
         "seeds": 5, "size_bytes": 1.2e4, "latency_ms_p50": 0.02},
    ])
    for x in ("size_bytes", "latency_ms_p50"):
        fig = figures.roi_scatter(points, x)
        assert [t.name for t in fig.data][0] == "teacher" and fig.layout.xaxis.type == "log"
    fig = figures.roi_cost_bars({"teacher_monthly": 2.0, "student_monthly": 0.5,
                                 "saving_monthly": 1.5}, "kd")
    assert list(fig.data[0].y) == [2.0, 0.5] and "saving $1.50" in fig.layout.title.text


def test_a_strategy_keeps_its_colour_on_every_chart():
    df = pd.DataFrame({"class": ["0", "1"], "teacher": [0.9, 0.5], "kd": [0.9, 0.6],
                       "kd+be+br": [0.95, 0.8]})
    summary = {"teacher_test_accuracy": 0.8, "strategies": {
        name: {"mean": 0.9, "std": 0.01, "seeds": [0, 1]} for name in ("ce", "kd", "kd+be+br")}}
    points = pd.DataFrame([{"model": m, "kind": "student", "accuracy": 0.9, "accuracy_std": 0.0,
                            "seeds": 2, "size_bytes": 1e4, "latency_ms_p50": 0.02}
                           for m in ("ce", "kd", "kd+be+br")])
    epochs = pd.DataFrame([{"strategy": m, "seed": 0, "epoch": 0, "test_accuracy": 0.5}
                           for m in ("ce", "kd", "kd+be+br")])
    seen = defaultdict(set)
    for fig in (figures.per_class_before_after(df, highlight="kd+be+br"),
                figures.per_class_change(df, "kd+be+br"),
                figures.strategy_accuracy_bars(summary, "kd+be+br"),
                figures.roi_scatter(points, highlight="kd+be+br"),
                figures.learning_curves(epochs, highlight="kd+be+br")):
        for name, colour in colours(json.loads(fig.to_json())).items():
            seen[name].add(colour)
    assert seen == {"teacher": {figures.TEACHER}, "kd+be+br": {figures.STUDENT},
                    "kd": {figures.STRATEGY_COLOURS["kd"]}, "ce": {figures.STRATEGY_COLOURS["ce"]}}
    other = figures.strategy_colours(["kd+xx", "dkd+be"])
    assert other == figures.strategy_colours(["dkd+be", "kd+xx"])  # fixed, whatever the company
    assert figures.STUDENT not in other.values()


def colours(spec: dict) -> dict[str, str]:
    """Strategy name -> colour of the traces of one figure's JSON (app or report)."""
    out = {}
    for trace in spec["data"]:
        colour = trace.get("marker", {}).get("color") or trace.get("line", {}).get("color")
        if isinstance(colour, list):  # one bar or dot per strategy
            names = trace.get("text") if trace.get("type") == "scatter" else trace.get("x")
            out.update(zip(map(str, names), colour, strict=True))
        elif colour is not None and trace.get("name"):
            out[trace["name"]] = colour
    return out


def test_the_report_and_the_dashboard_draw_a_strategy_in_one_colour(trained, monkeypatch):
    ws, runs = trained
    strategies = {r.strategy for r in runs}
    monkeypatch.setenv("KDCORE_HOME", str(ws))
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    seen = defaultdict(set)

    def note(spec: dict, where: str) -> None:
        for name, colour in colours(spec).items():
            if name in strategies or name == "teacher":
                seen[name].add((colour, where))

    for chart in build_report(RunStore(ws)).charts:
        note(json.loads(chart.figure.to_json()), f"report {chart.slug}")
    for page in ("overview", "results", "roi"):
        at = AppTest.from_file(str(ROOT / "dashboard" / "app_pages" / f"{page}.py"),
                               default_timeout=120).run()
        assert not at.exception
        for element in at.get("plotly_chart"):
            if "results_delta_chart" not in element.proto.id:  # green/red: gain or loss
                note(json.loads(element.proto.spec), f"{page} {element.proto.id}")
    places = {where for found in seen.values() for _, where in found}
    assert len(places) >= 12  # report 4 charts, overview 1, results 4, roi 3
    assert {c for c, _ in seen["kd+be+br+dl"]} == {figures.STUDENT}  # the best student
    assert {c for c, _ in seen["kd"]} == {figures.STRATEGY_COLOURS["kd"]}
    assert {c for c, _ in seen["teacher"]} == {figures.TEACHER}


# --------------------------------------------------------------------------- the decision

PER_CLASS = [
    {"class": "<a href=x>cat", "delta_vs_ce": {"mean": 0.05, "ci95": [0.01, 0.09]},
     "p_adjusted_vs_ce": 0.01, "delta_vs_kd": None, "p_adjusted_vs_kd": None},
    {"class": "dog", "delta_vs_ce": {"mean": -0.03, "ci95": None}, "p_adjusted_vs_ce": None,
     "delta_vs_kd": {"mean": 0.0, "ci95": None}, "p_adjusted_vs_kd": None},
    {"class": "eel", "delta_vs_ce": None, "p_adjusted_vs_ce": None},
    {"class": "fox", "delta_vs_ce": {"mean": -0.10, "ci95": [-0.2, -0.05]},
     "p_adjusted_vs_ce": 0.0004},
    {"class": "gnu", "delta_vs_ce": {"mean": 0.02, "ci95": [-0.01, 0.05]},
     "p_adjusted_vs_ce": 0.3},
]


def test_per_class_significance_marks_the_significant_classes():
    fig = figures.per_class_significance(PER_CLASS, "ce", strategy="kd+be")
    traces = {t.name.split(" (")[0]: t for t in fig.data}
    assert set(traces) == {"significantly better", "significantly worse",
                           "no significant difference"}
    better, worse = traces["significantly better"], traces["significantly worse"]
    assert list(better.x) == ["&lt;a href=x&gt;cat"]  # escaped: shows as text, not a link
    assert list(better.y) == pytest.approx([5.0]) and better.marker.color == figures.RIGHT
    assert list(better.error_y.array) == pytest.approx([4.0])
    assert list(better.error_y.arrayminus) == pytest.approx([4.0])
    assert list(worse.x) == ["fox"] and worse.marker.color == figures.WRONG
    unclear = traces["no significant difference"]
    assert list(unclear.x) == ["dog", "gnu"]  # no interval, or an interval over 0
    assert list(unclear.error_y.array) == pytest.approx([0.0, 3.0])  # dog: no interval
    assert "None" not in fig.to_json()
    assert "1 without a difference" in fig.layout.title.subtitle.text
    hover = " ".join(unclear.hovertext)
    assert "no interval" in hover and "BH-adjusted p —" in hover


def test_per_class_significance_with_nothing_to_draw_and_a_bad_comparison():
    fig = figures.per_class_significance(PER_CLASS, "teacher")  # no class has the key
    assert [t for t in fig.data if t.type == "scatter"] == []
    assert "5 without a difference" in fig.layout.title.subtitle.text
    with pytest.raises(ValueError, match="against"):
        figures.per_class_significance(PER_CLASS, "dkd")


def test_error_map_counts_and_chart():
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    teacher = np.array([0, 1, 0, 1, 1, 2, 2])   # wrong on 2, 3, 6
    student = np.array([0, 2, 2, 1, 1, 2, 1])   # wrong on 1, 3, 6
    masks = {"both_wrong": (teacher != labels) & (student != labels),
             "fixed": (teacher != labels) & (student == labels),
             "newly_wrong": (teacher == labels) & (student != labels)}
    counts = figures.error_map_counts(masks)
    assert counts == {"both_right": 3, "both_wrong": 2, "fixed": 1, "newly_wrong": 1,
                      "total": 7}
    fig = figures.error_map_chart(counts, strategy="kd", seed=3)
    heat, cells = fig.data
    assert list(heat.y) == ["teacher right", "teacher wrong"]
    assert list(heat.x) == ["student right", "student wrong"]
    assert "both right</b><br>3 (42.9%)" in heat.text[0][0]
    assert "newly wrong" in heat.text[0][1] and "fixed" in heat.text[1][0]
    assert "both wrong</b><br>2 (28.6%)" in heat.text[1][1]
    assert [list(c) for c in cells.customdata] == [[0], [1], [2], [3]]
    assert "seed 3" in fig.layout.title.text and "7 test samples" in fig.layout.title.text
    empty = figures.error_map_chart({"both_wrong": 0, "fixed": 0, "newly_wrong": 0})
    assert len(empty.data[1].x) == 0  # nothing to click on an empty map
    assert "0 test samples" in empty.layout.title.text


def test_calibration_reliability_puts_the_teacher_and_students_on_one_chart():
    curve = {"bin_lower": [0.0, 0.5], "bin_upper": [0.5, 1.0], "confidence": [None, 0.8],
             "accuracy": [None, 0.7], "count": [0, 10]}
    fig = figures.calibration_reliability({"teacher": curve, "kd": curve, "<b>x": curve},
                                          highlight="kd")
    names = [t.name for t in fig.data]
    assert names == ["perfectly calibrated", "teacher", "kd", "&lt;b&gt;x"]
    assert fig.data[1].line.color == figures.TEACHER and fig.data[2].line.color == figures.STUDENT
    assert list(fig.data[1].x) == [0.8]  # the empty bin is skipped
    assert fig.layout.xaxis.tickformat == ".0%"


def test_inheritance_bars_show_the_ce_floor_and_the_excess():
    summary = {"strategies": {
        "ce": {"bias_inheritance": 0.27}, "kd": {"bias_inheritance": 0.37},
        "kd+be": {"bias_inheritance": None}}}
    fig = figures.bias_inheritance_bars(summary)
    assert list(fig.data[0].x) == ["ce", "kd"]
    assert list(fig.data[0].text) == ["27.0% (floor)", "37.0% (+10.0 pts over ce)"]
    assert fig.layout.shapes[0].y0 == pytest.approx(0.27)
    assert "27.0%, the floor" in fig.layout.title.subtitle.text
    no_ce = figures.bias_inheritance_bars({"strategies": {"kd": {"bias_inheritance": 0.4}}})
    assert list(no_ce.data[0].text) == ["40.0%"] and not no_ce.layout.shapes
