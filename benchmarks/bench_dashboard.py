"""The Teacher bias page on the bundled sample and a 1,000,000-row table: first render, the
label-error verdicts arriving later, and a cached rerun.

    python benchmarks/bench_dashboard.py [--rows 1000000] [--classes 10]

Runs the real page through Streamlit's AppTest (no browser). The baseline, measured in the
same run, is the engine alone: ``kdcore.analysis.analyzer.report`` on the same rows, which
is the least work any rendering of the page must do. Figures are ratios against it.

First render: the run that draws the charts. The label check (cleanlab) runs in a task
process meanwhile (:mod:`kdcore.store.label_checks`); "verdicts shown" is when a rerun first
shows them, polled every 0.25 s, counted from the start of the first render. The target:
first render at most 3x the engine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import streamlit as st
from streamlit.delta_generator import DeltaGenerator
from streamlit.testing.v1 import AppTest

from kdcore.analysis.analyzer import report, select
from kdcore.data.sources import load_predictions
from kdcore.data.tables import PredictionTable

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "dashboard" / "app_pages" / "teacher_bias.py"
NAME = "big.parquet (uploaded)"


def make_table(rows: int, classes: int) -> PredictionTable:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, rows)
    logits = rng.standard_normal((rows, classes), dtype=np.float32)
    logits[np.arange(rows), labels] += 2.5  # a teacher right about 80% of the time
    return PredictionTable(source="big.parquet", class_names=[str(c) for c in range(classes)],
                           outputs=logits, kind="logits", labels=labels,
                           split=np.full(rows, "test", dtype=object), sample_id=None, extra=None)


def verdicts_shown(at: AppTest) -> bool:
    return any("Trust the label or the teacher?" in m.value for m in at.markdown)


def check_state(at: AppTest) -> str:
    """shown (the verdicts), running (the note), or what the page says instead."""
    if verdicts_shown(at):
        return "shown"
    if any("Checking for label errors" in i.value or "Label errors checked" in i.value
           for i in at.info):
        return "running"  # or just done: the page reruns itself to show them
    return " / ".join([e.value for e in at.error] + [w.value for w in at.warning]
                       + [i.value for i in at.info]) or "nothing"


class ChartClock:
    """When the page hands Streamlit its bias heatmap, the second of its two bias charts: in
    a browser they show then, while the rest of the script still runs."""

    def __init__(self) -> None:
        self.at: float | None = None
        original = DeltaGenerator.plotly_chart

        def plotly_chart(dg, *args, **kwargs):
            out = original(dg, *args, **kwargs)
            if self.at is None and str(kwargs.get("key", "")).startswith("bias_heatmap"):
                self.at = time.perf_counter()
            return out

        DeltaGenerator.plotly_chart = plotly_chart


CLOCK = ChartClock()


def measure(label: str, engine_table: PredictionTable, setup, timeout: float) -> None:
    """Engine alone, then the page's first render, the verdicts' arrival and a cached rerun."""
    start = time.perf_counter()
    report(engine_table)
    engine = time.perf_counter() - start

    at = setup()
    CLOCK.at = None
    start = time.perf_counter()
    at.run()
    cold = time.perf_counter() - start
    charts = (CLOCK.at or float("nan")) - start
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) >= 5, "the charts were not drawn"
    first_state = check_state(at)
    while ((state := check_state(at)) in ("running", "nothing")
           and time.perf_counter() - start < timeout):
        time.sleep(0.25)
        at.run()
    arrived = time.perf_counter() - start
    assert not at.exception, at.exception
    rerun_start = time.perf_counter()
    at.run()
    cached = time.perf_counter() - rerun_start
    assert not at.exception, at.exception

    print(f"Teacher bias page, {label}")
    print(f"  engine alone (analysis.report)  {engine:7.3f} s   baseline")
    print(f"  page, bias charts drawn         {charts:7.3f} s   {charts / engine:5.2f}x the engine")
    print(f"  page, first render (whole run)  {cold:7.3f} s   {cold / engine:5.2f}x the engine"
          f"   (label check: {first_state})")
    print(f"  label-error verdicts shown      {arrived:7.3f} s   after the first render began"
          f"   ({state})")
    print(f"  page, cached rerun              {cached:7.3f} s   {cached / engine:5.2f}x the engine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600,
                        help="longest wait for the verdicts, seconds (600)")
    args = parser.parse_args()
    # Warm up as a running server is: modules imported, the sample's check done once; then
    # every cache emptied and a new workspace, so nothing measured below is cached.
    os.environ["KDCORE_HOME"] = tempfile.mkdtemp(prefix="kdcore-bench-")
    warm = AppTest.from_file(str(PAGE), default_timeout=600).run()
    while check_state(warm) in ("running", "nothing"):
        time.sleep(0.25)
        warm.run()
    st.cache_data.clear()
    st.cache_resource.clear()
    os.environ["KDCORE_HOME"] = tempfile.mkdtemp(prefix="kdcore-bench-")

    sample = select(load_predictions(None), "test")  # the page's default rows
    measure(f"bundled sample ({sample.n_samples:,} test rows)", sample,
            lambda: AppTest.from_file(str(PAGE), default_timeout=600), args.timeout)

    table = make_table(args.rows, args.classes)

    def big() -> AppTest:
        at = AppTest.from_file(str(PAGE), default_timeout=600)
        at.session_state["data_uploads"] = {NAME: table}
        at.session_state["data_upload_tokens"] = {NAME: "bench"}
        at.session_state["bias_source"] = NAME
        return at

    measure(f"{args.rows:,} rows x {args.classes} classes (an upload)", table, big,
            args.timeout)


if __name__ == "__main__":
    main()
