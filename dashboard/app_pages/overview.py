"""Overview: does a small student distilled from a biased teacher pay off? Numbers and a chart."""

from __future__ import annotations

from functools import partial

import pandas as pd
import streamlit as st

from kdcore.analysis.analyzer import report, select
from kdcore.analysis.decision import CE
from kdcore.data.bundles import sample_bundle_path
from kdcore.errors import KDCoreError
from kdcore.learning.strategies import DEFAULT_STRATEGIES, plain_name
from kdcore.store import selection
from kdcore.store.jobs import default_max_jobs, start_queued
from kdcore.store.runs import Run
from kdcore.value import figures
from kdcore.value.before_after import before_after, shown_students
from kdcore.value.compare import BASELINE, start_demo, summarise
from kdcore.value.formatting import (
    format_bytes,
    format_interval,
    format_money,
    format_payback,
)
from kdcore.value.recommend import latest_recommendation
from kdcore.value.report import report_download
from kdcore.value.roi import with_assumptions
from kdcore_app import state

DEMO_RUNS = len(DEFAULT_STRATEGIES) * selection.DEMO_SEEDS
SEEN_DONE = "overview_done_seen"  # finished runs the page last drew: another one reruns it
LATENCY_ROW = "latency per request (median, batch 1)"
COST_ROW = "cost per million predictions"
PAYBACK_ROW = "payback, in predictions"


def sample_runs() -> list[Run]:
    """Every run on the bundled sample, any status."""
    return selection.on_bundle(state.store().list(), sample_bundle_path())


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def side_by_side(teacher_accuracy: float | None, best: dict, teacher_params: int | None,
                 measured: dict | None) -> pd.DataFrame:
    """Accuracy, size (parameters), latency and cost of the teacher and the best student, one
    row each; latency and cost come from the ROI measurement, "not measured yet" without one."""
    n = len(best["seeds"])
    spread = f" ± {best['std'] * 100:.1f} pts over {n} seeds" if n > 1 else " (one seed)"
    s_params = best.get("student_params")
    rows = [("accuracy on held-out data",
             "—" if teacher_accuracy is None else f"{teacher_accuracy:.1%}",
             f"{best['mean']:.1%}{spread}",
             "—" if teacher_accuracy is None
             else f"{(best['mean'] - teacher_accuracy) * 100:+.1f} pts"),
            ("size (parameters)", f"{teacher_params:,}" if teacher_params else "—",
             f"{s_params:,}" if s_params else "—",
             f"{teacher_params / s_params:,.0f}x smaller" if s_params and teacher_params
             else "—")]
    if measured is None:
        wait = "not measured yet"
        rows += [(LATENCY_ROW, wait, wait, ""), (COST_ROW, wait, wait, "")]
    else:
        t, s = measured["teacher"], measured["student"]
        latency = [format_interval({"median": side["latency_ms_p50"],
                                    "ci95": side.get("latency_ms_p50_ci95")}, "{:,.3f}".format,
                                   " ms")
                   for side in (t, s)]
        rows.append((LATENCY_ROW, *latency,
                     f"{t['latency_ms_p50'] / s['latency_ms_p50']:,.1f}x faster"))
        money = measured["cost_per_million"]
        made = measured["student_training_cost"]["dollars"]
        rows += [(COST_ROW, format_interval(money["teacher"]), format_interval(money["student"]),
                  f"{format_money(money['saving']['median'])} saved"),
                 (PAYBACK_ROW, "", format_payback(measured["payback_predictions"]),
                  f"training cost {format_money(made)}"),
                 ("size on disk", format_bytes(t["size_bytes"]), format_bytes(s["size_bytes"]),
                  f"{t['size_bytes'] / s['size_bytes']:,.0f}x smaller on disk")]
    return pd.DataFrame(rows, columns=["", "teacher", "best student", "student vs teacher"])


@st.fragment(run_every=2)
def demo_progress() -> None:
    """Live count of the sample's runs with an ETA; reruns the whole page when another run has
    finished (the numbers fill in) and when none is queued or running."""
    try:
        start_queued(state.store().workspace)  # the queue goes on if a job died before its turn
    except (KDCoreError, OSError) as exc:
        state.show_error(exc, "Could not start the next demo run: ")
    runs = sample_runs()
    counts = pd.Series([r.status for r in runs], dtype=object).value_counts()
    done, failed = int(counts.get("done", 0)), int(counts.get("failed", 0))
    running, queued = int(counts.get("running", 0)), int(counts.get("queued", 0))
    total = max(DEMO_RUNS, len(runs))
    eta = selection.eta_seconds(runs, default_max_jobs())
    st.progress(min((done + failed) / total, 1.0),
                text=f"{done} of {total} runs done · {running} running · {queued} queued"
                     + (f" · {failed} failed" if failed else "")
                     + (f" · about {_duration(eta)} left" if eta is not None
                        else " · time left: after the first run" if running or queued else ""))
    for r in runs:
        if r.status == "running":
            st.caption(f"{r.strategy}, seed {r.seed}: {(r.fraction or 0):.0%} trained")
    if failed:
        first = next(r for r in runs if r.status == "failed")
        st.error(f"Run {first.id} ({first.strategy}, seed {first.seed}) failed: {first.error}. "
                 "Fix: see the Train page, or run `kdcore demo` in a terminal.",
                 icon=":material/error:")
    if (not running and not queued) or done != st.session_state.get(SEEN_DONE, done):
        st.rerun(scope="app")


def render_recommendation() -> None:
    """The latest recipe search on the sample (``kdcore recommend``), one line and a link."""
    found = latest_recommendation(state.store().workspace, sample_bundle_path())
    if found:
        st.info(f"**Recipe search:** {found['summary']}", icon=":material/search:")
        st.page_link("app_pages/train.py", label="The search on the Train page",
                     icon=":material/arrow_forward:")


st.title("Can the student beat its biased teacher?")
st.markdown(
    "A large **teacher** model is distilled into a much smaller **student**. Teachers make "
    "systematic mistakes, and plain knowledge distillation (KD) teaches those mistakes to the "
    "student. **Bias-aware distillation** drops or corrects the teacher's wrong answers before "
    "the student learns from them. This page says, on the bundled sample, whether that pays: "
    "accuracy on held-out data, averaged over several training seeds.")

store = state.store()
st.download_button(
    "Download report", data=partial(report_download, store,
                                    assumptions=state.roi_assumptions()),
    file_name="kdcore-report.html",
    mime="text/html", icon=":material/download:", key="overview_download_report",
    on_click="ignore",
    help="One HTML file that opens offline: the teacher's bias, the comparison, size, speed "
         "and serving cost, and the configs and seeds behind them (same as `kdcore report`).")
render_recommendation()
try:
    all_runs = store.list()
except KDCoreError as exc:
    state.show_error(exc, "Cannot read the run store: ")
    st.stop()
groups = selection.comparable_groups(all_runs)
headline = selection.headline(groups)
runs = groups[headline] if headline else []
is_demo = bool(selection.demo_runs(runs))
on_sample = selection.on_bundle(all_runs, sample_bundle_path())
active = selection.pending(on_sample)
st.session_state[SEEN_DONE] = sum(r.status == "done" for r in on_sample)
# While the demo fills in, the numbers wait until every strategy has a first seed: a
# comparison without ce or kd would name a "best" it cannot judge.
missing = ([s for s in DEFAULT_STRATEGIES if s not in {r.strategy for r in runs}]
           if is_demo and selection.demo_runs(active) else [])

try:
    sample_name = next(iter(state.bundle_choices()))
    table = state.load_source(sample_name)
except (KDCoreError, OSError) as exc:
    state.show_error(exc, "The bundled sample cannot be read: ")
    st.stop()

if not runs or missing:
    teacher_acc = report(select(table, "test")).accuracy if "test" in table.splits else None
    if teacher_acc is not None:
        st.metric("Teacher accuracy on held-out data", f"{teacher_acc:.1%}",
                  help="How often the teacher is right on the bundled sample's test split.")
    st.subheader("No finished comparison yet")
    if active:
        st.write(f"The demo comparison is training in the background: {len(DEFAULT_STRATEGIES)} "
                 f"strategies × {selection.DEMO_SEEDS} seeds on the bundled sample, seed by "
                 "seed. The numbers appear here as soon as every strategy has its first seed, "
                 "and sharpen as more seeds finish. You can leave this page; the runs carry on.")
        demo_progress()
    else:
        st.write(f"Run the demo: it trains {DEMO_RUNS} small students ({len(DEFAULT_STRATEGIES)} "
                 f"strategies × {selection.DEMO_SEEDS} seeds) on the bundled sample in the "
                 "background, usually in one to two minutes, and this page fills in as they "
                 "finish: the first numbers once every strategy has its first seed.")
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

summary = summarise(runs, store)
strategies = summary["strategies"]
decision = summary.get("decision") or {}
teacher = summary["teacher_test_accuracy"]
best_name = selection.best_student(runs)
best = strategies[best_name]
n_seeds = len(best["seeds"])
if not is_demo:
    st.caption(f"Showing your own runs on the bundled sample ({len(runs)} runs); "
               "the demo comparison has not been run in this workspace.")
if active:
    seeds = sorted({len(e["seeds"]) for e in strategies.values()})
    so_far = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]} to {seeds[-1]}"
    st.caption(f"Filling in: over {so_far} seed{'s' if seeds[-1] != 1 else ''} so far; the "
               "numbers and the decision update as each run finishes (the decision needs at "
               "least 2 seeds).")
    demo_progress()

m1, m2, m3, m4 = st.columns(4)
m1.metric("Teacher accuracy", f"{teacher:.1%}" if teacher is not None else "—",
          help="The teacher's accuracy on the held-out test split.")
m2.metric("Best: train on labels alone" if best_name == CE else f"Best student: {best_name}",
          f"{best['mean']:.1%}",
          delta=(f"{(best['mean'] - teacher) * 100:+.1f} pts vs teacher"
                 if teacher is not None else None),
          help=(f"Mean held-out accuracy over {n_seeds} seeds (± {best['std'] * 100:.1f} pts)"
                if n_seeds > 1 else "Held-out accuracy of one seed so far (no spread yet)")
               + ", last epoch: the decision's best strategy, ce (the student trained on the "
               "labels alone, no teacher) included; the student the ROI page and the report "
               "measure.")
vs_ce = decision.get("delta_vs_ce")
if vs_ce:
    ci, level = vs_ce.get("ci95"), decision.get("ci_level") or 0.95
    m3.metric("Distillation vs labels alone", f"{vs_ce['mean'] * 100:+.1f} pts",
              delta=(f"interval {ci[0] * 100:+.1f} to {ci[1] * 100:+.1f}, "
                     f"{(decision.get('adjustment') or '').split(', ', 1)[-1]}"
                     if ci else "no interval: cannot tell"),
              delta_color="off", delta_arrow="off",
              help=f"The best distilled student ({decision.get('best_distilled')}) against ce, "
                   "paired over the same seeds, adjusted for picking the best after the fact "
                   f"({decision.get('adjustment')}): the interval is {level:.1%} for this one "
                   "comparison, 95% for the family of comparisons.")
else:
    m3.metric("Distillation vs labels alone", "—",
              help=decision.get("note") or "Train `ce` with the same seeds to compare.")
s_params = best.get("student_params")
t_params = runs[0].metrics.get("teacher_params")
if s_params and t_params:
    m4.metric("Student size (parameters)", f"{t_params / s_params:,.0f}× smaller",
              delta=f"{s_params:,} vs {t_params:,} parameters", delta_color="off",
              delta_arrow="off", help="Parameters of the student against the teacher's: "
                                      "what \"smaller\" means on every page; bytes on disk "
                                      "are shown as such.")
else:
    m4.metric("Student size (parameters)", "—")

m2.caption(state.strategy_label(best_name))

head, sep, rest = summary["verdict"].partition(":")
st.info(f"**{head}:** {rest.strip()}" if sep and len(head) < 20 else summary["verdict"],
        icon=":material/lightbulb:")

# ---------------------------------------------------------------- side by side, with the cost
st.subheader("Teacher and best student, side by side")
priced = selection.closest_to_mean(selection.by_strategy(runs)[best_name])
measured = state.roi_measurement(sample_bundle_path(), priced.id, measure=False)
if measured is not None and state.roi_assumptions() is not None:  # priced as on the ROI page
    measured = with_assumptions(measured, state.roi_assumptions())
if measured is None and st.button(
        "Measure latency and cost", icon=":material/timer:", key="overview_measure",
        help="Times the teacher and this student now, on this machine (the ROI page's "
             "measurement; it takes a few seconds and is kept for every page)."):
    try:
        state.roi_measurement(sample_bundle_path(), priced.id)
    except KDCoreError as exc:
        state.show_error(exc, "Cannot measure: ")
    else:
        st.rerun()  # drawn again without the button
st.dataframe(side_by_side(teacher, best, t_params, measured), hide_index=True, width="stretch")
if measured is None:
    st.caption("Latency and cost are measured, never assumed: press **Measure latency and "
               "cost**, or open the **ROI** page, which measures them and sets the traffic.")
else:
    a = measured["cost"]["assumptions"]
    st.caption(f"Student: run `{measured['run_id']}`, {state.strategy_label(best_name)}. "
               f"Latency measured on this machine with torch, median and 95% interval over the "
               f"repeated measurements; cost at {format_money(a['cost_per_hour'])} per "
               f"machine-hour and {a['utilisation']:.0%} utilisation; payback: the predictions "
               "it takes before the serving saving repays what training the student cost. The "
               "**ROI** page has the bill at your traffic and ONNX Runtime.")

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
    rows = [{"strategy": n, "in words": plain_name(n),
             "accuracy (mean)": e["mean"] * 100,
             "± std (pts)": e["std"] * 100 if len(e["seeds"]) > 1 else None,
             "vs ce (pts)": (e["delta_vs_ce"]["mean"] * 100
                             if e.get("delta_vs_ce") and n != CE else None),
             "vs KD (pts)": (e["delta_vs_kd"]["mean"] * 100
                             if e["delta_vs_kd"] and n != BASELINE else None),
             "copies teacher errors": (e["bias_inheritance"] * 100
                                       if e["bias_inheritance"] is not None else None),
             "excess over ce (pts)": (e["excess_inheritance"] * 100
                                      if e.get("excess_inheritance") is not None and n != CE
                                      else None),
             "seeds": len(e["seeds"])}
            for n, e in strategies.items()]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", placeholder="—",
                 column_config={
        "accuracy (mean)": st.column_config.NumberColumn(format="%.1f%%"),
        "± std (pts)": st.column_config.NumberColumn(
            format="%.1f", help="Standard deviation over seeds; — with one seed (no spread)."),
        "vs ce (pts)": st.column_config.NumberColumn(
            format="%+.1f", help="Paired difference to ce (labels alone) on the same seeds."),
        "vs KD (pts)": st.column_config.NumberColumn(format="%+.1f"),
        "copies teacher errors": st.column_config.NumberColumn(format="%.1f%%"),
        "excess over ce (pts)": st.column_config.NumberColumn(
            format="%+.1f", help="Teacher errors copied minus ce's share: ce never sees the "
                                 "teacher, so its share is the floor."),
    })
