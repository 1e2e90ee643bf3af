"""Overview: does a small student distilled from a biased teacher pay off? Numbers and a chart."""

from __future__ import annotations

from functools import partial

import pandas as pd
import streamlit as st

from kdcore.analysis.analyzer import report, select
from kdcore.data.bundles import sample_bundle_path
from kdcore.errors import KDCoreError
from kdcore.learning.strategies import DEFAULT_STRATEGIES
from kdcore.store import selection
from kdcore.store.jobs import start_queued
from kdcore.store.runs import Run
from kdcore.value import figures
from kdcore.value.before_after import before_after, shown_students
from kdcore.value.compare import BASELINE, start_demo, summarise
from kdcore.value.report import report_download
from kdcore_app import state

DEMO_RUNS = len(DEFAULT_STRATEGIES) * selection.DEMO_SEEDS


def sample_runs() -> list[Run]:
    """Every run on the bundled sample, any status."""
    return selection.on_bundle(state.store().list(), sample_bundle_path())


@st.fragment(run_every=2)
def demo_progress() -> None:
    """Live count of the demo's runs; reruns the whole page when none is queued or running."""
    try:
        start_queued(state.store().workspace)  # the queue goes on if a job died before its turn
    except (KDCoreError, OSError) as exc:
        state.show_error(exc, "Could not start the next demo run: ")
    runs = sample_runs()
    counts = pd.Series([r.status for r in runs], dtype=object).value_counts()
    done, failed = int(counts.get("done", 0)), int(counts.get("failed", 0))
    running, queued = int(counts.get("running", 0)), int(counts.get("queued", 0))
    total = max(DEMO_RUNS, len(runs))
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
    if not running and not queued:
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
groups = selection.comparable_groups(all_runs)
headline = selection.headline(groups)
runs = groups[headline] if headline else []
is_demo = bool(selection.demo_runs(runs))
active = selection.pending(selection.on_bundle(all_runs, sample_bundle_path()))

try:
    sample_name = next(iter(state.bundle_choices()))
    table = state.load_source(sample_name)
except (KDCoreError, OSError) as exc:
    state.show_error(exc, "The bundled sample cannot be read: ")
    st.stop()

if not runs:
    teacher_acc = report(select(table, "test")).accuracy if "test" in table.splits else None
    if teacher_acc is not None:
        st.metric("Teacher accuracy on held-out data", f"{teacher_acc:.1%}",
                  help="How often the teacher is right on the bundled sample's test split.")
    st.subheader("No finished comparison yet")
    if active:
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
                start_demo(store.workspace)
            except (KDCoreError, OSError) as exc:
                st.error(f"Could not start the demo ({exc}). Fix: check that the workspace "
                         f"{store.workspace} is writable, or run `kdcore demo` in a terminal.",
                         icon=":material/error:")
            else:
                st.rerun()
    st.stop()

summary = summarise(runs)
strategies = summary["strategies"]
teacher = summary["teacher_test_accuracy"]
best_name = selection.best_student(runs)
best = strategies[best_name]
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
               "last epoch: the bias-aware strategy with the best mean (vanilla KD and ce are "
               "its baselines), the student the ROI page and the report measure.")
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
    m4.metric("Student size (parameters)", f"{t_params / s_params:,.0f}× smaller",
              delta=f"{s_params:,} vs {t_params:,} parameters", delta_color="off",
              delta_arrow="off", help="Parameters of the student against the teacher's; the "
                                      "ROI page compares bytes on disk.")
else:
    m4.metric("Student size (parameters)", "—")

st.info(summary["verdict"], icon=":material/lightbulb:")

# ---------------------------------------------------------------- before / after per class
try:
    frame = before_after(store, runs, shown_students(runs))
except KDCoreError as exc:
    state.show_error(exc, "The per-class comparison: ")
else:
    st.plotly_chart(figures.per_class_before_after(
        frame, highlight=best_name, title="Per-class accuracy on held-out data: teacher (before) "
                                          "vs students (after, mean over seeds)"),
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
