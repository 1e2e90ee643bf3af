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

As in a running server, Streamlit's component scan (once at server start) and the page's
compiled code (once per server) are shared by every run; AppTest would otherwise redo both on
each run, 0.1-0.5 s that a server never spends on a page view. "Streamlit alone" is the same
harness running a page that draws one line: what any page's run costs before its own work.
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
from streamlit.runtime.scriptrunner.script_cache import ScriptCache
from streamlit.testing.v1 import AppTest, app_test, local_script_runner

from kdcore.analysis.analyzer import report, select
from kdcore.data.sources import load_predictions
from kdcore.data.tables import PredictionTable
from kdcore.store.label_checks import LABEL_CHECKS_DIR
from kdcore.store.tasks import stop_tasks

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


class Server:
    """What a running server shares between page views: the custom-component registry
    (scanned once at start) and the compiled page scripts. AppTest keeps neither (private
    attributes: there is no option for it), so each AppTest here gets the ones of the server."""

    def __init__(self) -> None:
        scripts = ScriptCache()
        for module in (app_test, local_script_runner):  # each makes a new one on every run
            module.ScriptCache = lambda: scripts
        self.components = None

    def page(self, path: Path | str) -> AppTest:
        at = AppTest.from_file(str(path), default_timeout=600)
        if self.components is None:
            self.components = at.run()._bidi_component_manager  # the scan, done once
            at = AppTest.from_file(str(path), default_timeout=600)
        at._bidi_component_manager = self.components
        return at


SERVER = Server()


def streamlit_alone() -> float:
    """One run of a page that draws one line (its second: the first compiles it)."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as page:
        page.write("import streamlit as st\n\nst.write('one line')\n")
    at = SERVER.page(page.name).run()
    start = time.perf_counter()
    at.run()
    took = time.perf_counter() - start
    os.unlink(page.name)
    return took


def stop_check(workspace: str, timeout: float = 120) -> None:
    """End the label check that a first render began (its task, once the page's thread has
    started it), so that the next repeat is not measured beside it."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if stop_tasks(workspace) or any(Path(workspace, LABEL_CHECKS_DIR).glob("*.npz")):
            return
        time.sleep(0.1)


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def first_render(engine_table: PredictionTable, setup, from_file) -> tuple:
    """In a new workspace with every cache emptied: the engine alone (and from the file, if
    the page reads one), then the page's first render (start, seconds to its bias charts,
    seconds to its end, the AppTest)."""
    os.environ["KDCORE_HOME"] = tempfile.mkdtemp(prefix="kdcore-bench-")
    st.cache_data.clear()
    st.cache_resource.clear()
    engine = timed(lambda: report(engine_table))
    engine_file = timed(from_file) if from_file else engine
    at = setup()
    CLOCK.at = None
    start = time.perf_counter()
    at.run()
    cold = time.perf_counter() - start
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) >= 5, "the charts were not drawn"
    return engine, engine_file, start, (CLOCK.at or float("nan")) - start, cold, at


def spread(ratios: list[float]) -> str:
    return f"{np.median(ratios):5.2f}x the engine ({min(ratios):.2f}-{max(ratios):.2f}x)"


def measure(label: str, engine_table: PredictionTable, setup, timeout: float,
            repeats: int, from_file=None) -> None:
    """Engine alone and the page's first render, ``repeats`` times (each pair back to back,
    so a busy machine slows both); then the last render's verdicts and a cached rerun.

    ``from_file``: the engine's whole analysis when the page starts from a file (the sample:
    read the bundle, pick the held-out rows, report), the baseline proposed for a small table,
    where reading the file and Streamlit's fixed costs outweigh the analysis itself."""
    runs = []
    for _ in range(repeats):
        if runs:
            stop_check(os.environ["KDCORE_HOME"])
        runs.append(first_render(engine_table, setup, from_file))
    engines, files, _, charts, colds, _ = (list(v) for v in zip(*runs, strict=True))
    engine, _, start, _, _, at = runs[-1]
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

    floor = streamlit_alone()
    median = float(np.median(engines))
    print(f"Teacher bias page, {label}; medians of {repeats} first renders (range of ratios)")
    print(f"  engine alone (analysis.report)  {median:7.3f} s   baseline")
    print(f"  Streamlit alone (a 1-line page) {floor:7.3f} s   {floor / median:5.2f}x the engine")
    print(f"  page, bias charts drawn         {np.median(charts):7.3f} s   "
          + spread([c / e for c, e in zip(charts, engines, strict=True)]))
    if from_file:
        print(f"  engine from the file            {np.median(files):7.3f} s   (read, select, "
              "report)")
        print("  page, bias charts drawn         " + " " * 10
              + spread([c / e for c, e in zip(charts, files, strict=True)]).replace(
                  "the engine", "the engine from the file"))
    print(f"  page, first render (whole run)  {np.median(colds):7.3f} s   "
          + spread([c / e for c, e in zip(colds, engines, strict=True)])
          + f"   (label check: {first_state})")
    print(f"  label-error verdicts shown      {arrived:7.3f} s   after the last first render "
          f"began   ({state})")
    print(f"  page, cached rerun              {cached:7.3f} s   {cached / engine:5.2f}x the engine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600,
                        help="longest wait for the verdicts, seconds (600)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="first renders measured per table, each in a new workspace (5)")
    args = parser.parse_args()
    # Warm up as a running server is: modules imported, the page compiled, the sample's check
    # done once. Each first render below then gets a new workspace and empty caches.
    os.environ["KDCORE_HOME"] = tempfile.mkdtemp(prefix="kdcore-bench-")
    warm = SERVER.page(PAGE).run()
    while check_state(warm) in ("running", "nothing"):
        time.sleep(0.25)
        warm.run()

    sample = select(load_predictions(None), "test")  # the page's default rows
    measure(f"bundled sample ({sample.n_samples:,} test rows)", sample,
            lambda: SERVER.page(PAGE), args.timeout, args.repeats,
            lambda: report(select(load_predictions(None), "test")))

    table = make_table(args.rows, args.classes)

    def big() -> AppTest:
        at = SERVER.page(PAGE)
        at.session_state["data_uploads"] = {NAME: table}
        at.session_state["data_upload_tokens"] = {NAME: "bench"}
        at.session_state["bias_source"] = NAME
        return at

    measure(f"{args.rows:,} rows x {args.classes} classes (an upload)", table, big,
            args.timeout, args.repeats)


if __name__ == "__main__":
    main()
