"""Overview: does a small student distilled from a biased teacher pay off? Numbers and a chart."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import charts, state
from kdcore.analysis.analyzer import report, select
from kdcore.data.bundles import load_bundle, sample_bundle_path
from kdcore.errors import KDCoreError
from kdcore.store.runs import Run, config_key
from kdcore.value.compare import BASELINE, DEFAULT_STRATEGIES, comparable_groups, plan, summarise
from kdcore.value.report import report_download

DEMO_SEEDS = 5
DEMO_RUNS = len(DEFAULT_STRATEGIES) * DEMO_SEEDS
DEMO_LOG = "demo.log"
ACTIVE = ("queued", "running")


@st.cache_data(show_spinner=False)
def teacher_per_class(token: str, _table) -> pd.DataFrame:
    """The teacher's per-class accuracy on held-out data."""
    return report(select(_table, "test" if "test" in _table.splits else None)).per_class


def _is_sample(run: Run) -> bool:
    try:
        return Path(run.bundle or "").resolve() == sample_bundle_path().resolve()
    except OSError:
        return False


def comparison_runs(done: list[Run]) -> tuple[list[Run], bool]:
    """The comparison to headline: the demo's if any of it is done, else the largest one."""
    try:
        demo_keys = {config_key(c.to_dict())
                     for c in plan(load_bundle(None), DEFAULT_STRATEGIES, range(DEMO_SEEDS))}
    except KDCoreError:
        demo_keys = set()
    sample = [r for r in done if _is_sample(r) and r.metrics.get("test_accuracy") is not None]
    groups = list(comparable_groups(sample).values())  # largest first
    for group in groups:
        if any((r.config_key or config_key(r.config)) in demo_keys for r in group):
            return group, True
    return (groups[0] if groups else []), False


def start_demo() -> None:
    """Run the demo comparison in one detached process (it trains two runs at a time)."""
    workspace = state.store().workspace
    log = open(workspace / DEMO_LOG, "ab")  # noqa: SIM115 - handed to the child process
    env = {**os.environ, "KDCORE_HOME": str(workspace)}
    proc = subprocess.Popen([sys.executable, "-m", "kdcore", "demo", "--quiet"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env, cwd=str(workspace))
    log.close()
    st.session_state["overview_demo"] = {"proc": proc, "started": time.time()}


def _log_tail(lines: int = 3) -> str:
    try:
        text = (state.store().workspace / DEMO_LOG).read_text(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(text.splitlines()[-lines:])


@st.fragment(run_every=2)
def demo_progress() -> None:
    """Live count of the demo's runs; reruns the whole page when they are all finished."""
    runs = [r for r in state.store().list() if _is_sample(r)]
    counts = pd.Series([r.status for r in runs], dtype=object).value_counts()
    done, failed = int(counts.get("done", 0)), int(counts.get("failed", 0))
    running, queued = int(counts.get("running", 0)), int(counts.get("queued", 0))
    total = max(DEMO_RUNS, len(runs))
    demo = st.session_state.get("overview_demo")
    exited = demo is not None and demo["proc"].poll() is not None
    if not runs:
        if exited and demo["proc"].returncode != 0:
            st.error("The demo stopped before training started: "
                     f"{_log_tail() or 'no output'}. Fix: run `kdcore demo` in a terminal to "
                     "see the whole message.", icon=":material/error:")
            return
        st.progress(0.0, text="Starting the demo: loading the sample and the teacher…")
        return
    st.progress(min((done + failed) / total, 1.0),
                text=f"{done} of {total} runs done · {running} running · {queued} queued"
                     + (f" · {failed} failed" if failed else ""))
    for r in runs:
        if r.status == "running":
            st.caption(f"{r.strategy}, seed {r.seed}: {(r.fraction or 0):.0%} trained")
    if failed:
        first = next(r for r in runs if r.status == "failed")
        st.error(f"Run {first.id} ({first.strategy}, seed {first.seed}) failed: {first.error}. "
                 "Fix: see the Train page, or run `kdcore demo` in a terminal.",
                 icon=":material/error:")
    if not running and not queued and (exited or demo is None or done >= DEMO_RUNS):
        st.session_state.pop("overview_demo", None)
        st.rerun(scope="app")


st.title("Can the student beat its biased teacher?")
st.markdown(
    "A large **teacher** model is distilled into a much smaller **student**. Teachers make "
    "systematic mistakes, and plain knowledge distillation (KD) teaches those mistakes to the "
    "student. **Bias-aware distillation** drops or corrects the teacher's wrong answers before "
    "the student learns from them. This page says, on the bundled sample, whether that pays: "
    "accuracy on held-out data, averaged over several training seeds.")

store = state.store()
st.download_button(
    "Download report", data=partial(report_download, store), file_name="kdcore-report.html",
    mime="text/html", icon=":material/download:", key="overview_download_report",
    on_click="ignore",
    help="One HTML file that opens offline: the teacher's bias, the comparison, size, speed "
         "and serving cost, and the configs and seeds behind them (same as `kdcore report`).")
try:
    all_runs = store.list()
except KDCoreError as exc:
    state.show_error(exc, "Cannot read the run store: ")
    st.stop()
done_runs = [r for r in all_runs if r.status == "done"]
runs, is_demo = comparison_runs(done_runs)
active = [r for r in all_runs if r.status in ACTIVE and _is_sample(r)]
demo_running = "overview_demo" in st.session_state

try:
    sample_name = next(iter(state.bundle_choices()))
    table = state.load_source(sample_name)
    teacher_classes = teacher_per_class(state.source_token(sample_name), table)
except (KDCoreError, OSError) as exc:
    state.show_error(exc, "The bundled sample cannot be read: ")
    st.stop()

if not runs:
    teacher_acc = report(select(table, "test")).accuracy if "test" in table.splits else None
    if teacher_acc is not None:
        st.metric("Teacher accuracy on held-out data", f"{teacher_acc:.1%}",
                  help="How often the teacher is right on the bundled sample's test split.")
    st.subheader("No finished comparison yet")
    if active or demo_running:
        st.write("The demo comparison is training in the background: 5 strategies × 5 seeds "
                 "on the bundled sample (a minute or two). You can leave this page; the runs "
                 "carry on.")
        demo_progress()
    else:
        st.write(f"Run the demo: it trains {DEMO_RUNS} small students (5 strategies × 5 seeds) "
                 "on the bundled sample in the background, usually in one to two minutes, and "
                 "this page fills in as they finish.")
        if st.button("Run the demo", type="primary", key="overview_run_demo",
                     icon=":material/play_arrow:"):
            try:
                start_demo()
            except OSError as exc:
                st.error(f"Could not start the demo ({exc}). Fix: check that the workspace "
                         f"{store.workspace} is writable, or run `kdcore demo` in a terminal.",
                         icon=":material/error:")
            else:
                st.rerun()
    st.stop()

summary = summarise(runs)
strategies = summary["strategies"]
teacher = summary["teacher_test_accuracy"]
best_name, best = max(strategies.items(), key=lambda item: item[1]["mean"])
n_seeds = len(best["seeds"])
if not is_demo:
    st.caption(f"Showing your own runs on the bundled sample ({len(runs)} runs); "
               "the demo comparison has not been run in this workspace.")

m1, m2, m3, m4 = st.columns(4)
m1.metric("Teacher accuracy", f"{teacher:.1%}" if teacher is not None else "—",
          help="The teacher's accuracy on the held-out test split.")
m2.metric(f"Best student: {best_name}", f"{best['mean']:.1%}",
          delta=(f"{(best['mean'] - teacher) * 100:+.1f} pts vs teacher"
                 if teacher is not None else None),
          help=f"Mean held-out accuracy over {n_seeds} seeds (± {best['std'] * 100:.1f} pts), "
               "last epoch.")
delta = best["delta_vs_kd"]
if best_name == BASELINE:
    m3.metric("Gain over vanilla KD", "0.0 pts", help="The best student is vanilla KD itself.")
elif delta:
    ci = delta["ci95"]
    m3.metric("Gain over vanilla KD", f"{delta['mean'] * 100:+.1f} pts",
              delta=f"95% interval {ci[0] * 100:+.1f} to {ci[1] * 100:+.1f}" if ci else None,
              delta_color="off", delta_arrow="off",
              help="Paired difference against plain KD with the same seeds.")
else:
    m3.metric("Gain over vanilla KD", "—", help="Train `kd` with the same seeds to compare.")
s_params = best.get("student_params")
t_params = runs[0].metrics.get("teacher_params")
if s_params and t_params:
    m4.metric("Student size", f"{t_params / s_params:,.0f}× smaller",
              delta=f"{s_params:,} vs {t_params:,} parameters", delta_color="off",
              delta_arrow="off", help="Parameters of the student against the teacher's.")
else:
    m4.metric("Student size", "—")

st.info(summary["verdict"], icon=":material/lightbulb:")

# ---------------------------------------------------------------- before / after per class
frame = pd.DataFrame({"class": teacher_classes["class"].astype(str),
                      "teacher": teacher_classes["teacher_accuracy"].to_numpy()})
shown = [BASELINE] if BASELINE in strategies and best_name != BASELINE else []
for name in [*shown, best_name]:
    per_seed = [r.metrics.get("per_class_accuracy") or {} for r in runs if r.strategy == name]
    frame[f"{name} (mean of {len(per_seed)} seeds)"] = [
        np.nanmean([float(p.get(c, np.nan)) for p in per_seed]) if per_seed else np.nan
        for c in frame["class"]]
st.plotly_chart(charts.per_class_before_after(
    frame, title="Per-class accuracy on held-out data: teacher (before) vs students (after)"),
    key="overview_before_after", width="stretch")
st.caption("Where the teacher is biased (low grey bars) the students are trained on its "
           "mistakes; a bias-aware student should recover more of those classes than plain KD. "
           "Details per strategy are on the Results page; the teacher's mistakes on the Teacher "
           "bias page.")

with st.expander("All strategies"):
    rows = [{"strategy": n, "accuracy (mean)": e["mean"], "± std": e["std"],
             "vs KD (pts)": e["delta_vs_kd"]["mean"] * 100 if e["delta_vs_kd"] else None,
             "copies teacher errors": e["bias_inheritance"], "seeds": len(e["seeds"])}
            for n, e in strategies.items()]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", column_config={
        "accuracy (mean)": st.column_config.NumberColumn(format="percent"),
        "± std": st.column_config.NumberColumn(format="percent"),
        "vs KD (pts)": st.column_config.NumberColumn(format="%+.1f"),
        "copies teacher errors": st.column_config.NumberColumn(format="percent"),
    })
