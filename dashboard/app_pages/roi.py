"""ROI: is the student worth it? Cost per million predictions, payback, size and speed.

The engine (``kdcore.value.roi``) measures the teacher and the best student of the comparison in
this process on this machine, several times over; the page takes the cost assumptions as inputs
and draws the result, every money figure with its interval across the measurements.
"""

from __future__ import annotations

import os
from functools import partial

import pandas as pd
import streamlit as st

from kdcore.errors import KDCoreError
from kdcore.store import selection
from kdcore.value import figures, roi
from kdcore.value.formatting import format_bytes, format_count, format_interval, format_money
from kdcore.value.report import report_download
from kdcore_app import state

EMPTY = ("No students were trained yet, so there is nothing to weigh against the teacher. "
         "Go to **Overview** and press **Run the demo**, or run `kdcore demo` in a terminal.")
AGAIN = "roi_again"  # session flag: the next run measures anew
RUNTIMES = (("torch", None), ("ONNX Runtime", "onnx"))
SIDES = ("teacher", "student", "saving")


def _interval(ci: list[float]) -> str:
    """The delta line of a money metric: its 95% interval over the measurements."""
    return f"95% interval {format_money(ci[0])} to {format_money(ci[1])}"


def _latency(side: dict, key: str) -> str:
    """A latency with its interval across the measurements: "0.052 ms [0.050 to 0.055]"."""
    return format_interval({"median": side[key], "ci95": side.get(f"{key}_ci95")},
                           "{:,.3f}".format, " ms")


def latency_table(doc: dict) -> pd.DataFrame:
    """Teacher and student per runtime and batch size, median [95% interval], and the ratio."""
    serving = doc["measurements"]["serving_batch"]
    rows = []
    for runtime, key in RUNTIMES:
        sides = doc[key] if key else doc
        t, s = sides["teacher"], sides["student"]
        for batch, column in ((1, "latency_ms_p50"), (serving, "batch_ms_p50")):
            rows.append({"runtime": runtime, "batch": batch,
                         "teacher (median [95% interval])": _latency(t, column),
                         "student (median [95% interval])": _latency(s, column),
                         "student vs teacher": f"{t[column] / s[column]:,.1f}x faster"
                         if s[column] else "n/a"})
    return pd.DataFrame(rows)


def _count_interval(figure: dict) -> str | None:
    """The interval of a payback; an open upper end where the saving may be nothing."""
    low, high = figure.get("ci95") or (None, None)
    if low is None:
        return None
    return (f"95% interval {format_count(low)} to "
            + (format_count(high) if high is not None else "never (the saving may be nothing)"))


def _duration(months: float) -> str:
    days = months * 365.25 / 12
    if days < 1:
        return f"{days * 24:,.1f} hours"
    return f"{days:,.1f} days" if days < 60 else f"{months:,.1f} months"


def money_rows(doc: dict, student: str) -> None:
    """Cost per million predictions, then the bill at the traffic entered, each with its
    interval over the measurements."""
    per_million, cost = doc["cost_per_million"], doc["cost"]
    titles = ("Teacher", f"Student ({student})", "Saving")
    st.markdown("**Per million predictions**")
    for col, side, title in zip(st.columns(3), SIDES, titles, strict=True):
        figure = per_million[side]
        col.metric(f"{title}, per million predictions", format_money(figure["median"]),
                   delta=_interval(figure["ci95"]), delta_color="off", delta_arrow="off",
                   help="Median over the repeated measurements; the interval is the 95% "
                        "interval across them. Batch 1, the median latency.")
    st.markdown(f"**A month at {cost['assumptions']['requests_per_month']:,.0f} predictions**")
    for col, side, title in zip(st.columns(3), SIDES, titles, strict=True):
        col.metric(f"{title}, a month", format_money(cost[f"{side}_monthly"]),
                   delta=_interval(cost[f"{side}_monthly_ci95"]),
                   delta_color="off", delta_arrow="off")


def payback_row(doc: dict) -> None:
    """How many predictions before the serving saving repays the student's training."""
    payback, training = doc["payback_predictions"], doc["student_training_cost"]
    requests = doc["cost"]["assumptions"]["requests_per_month"]
    cols = st.columns(3)
    if payback.get("median") is not None:
        cols[0].metric(
            "Payback, in predictions", format_count(payback["median"]),
            delta=_count_interval(payback), delta_color="off", delta_arrow="off",
            help="Predictions it takes before the serving saving repays what the student cost "
                 "to make: its training time (every seed behind it) times the machine price.")
        cols[1].metric("Payback at your traffic",
                       _duration(payback["median"] / requests) if requests else "no traffic",
                       help="Payback in predictions divided by the predictions per month.")
    else:
        cols[0].metric("Payback, in predictions", "never", help=payback["reason"])
    runs = training["runs"]
    cols[2].metric("Training the student cost", format_money(training["dollars"]),
                   delta=f"{training['seconds']:,.0f} s of training over {runs} "
                         f"run{'s' if runs != 1 else ''}", delta_color="off", delta_arrow="off",
                   help="The measured training time of the runs behind the student (every "
                        "seed), times the machine price.")


st.title("Is the student worth it?")
st.markdown(
    "The teacher and the **best student** of your comparison (the one the Overview, Results "
    "and the report name), **measured now on this machine, in the same process**, with torch "
    "and with ONNX Runtime, and the whole measurement repeated so every figure has its spread. "
    "First what a million predictions cost, then the bill at your traffic and how soon the "
    "student repays what it cost to train.")

store = state.store()
try:
    done = store.list(status="done")
    choices = {**state.bundle_choices(), **selection.image_folders(done)}
    data_name = (st.selectbox("Data", list(choices), key="roi_bundle") if len(choices) > 1
                 else next(iter(choices)))
    data_path = choices[data_name]
    groups = selection.comparable_groups(selection.on_bundle(done, data_path))
except KDCoreError as exc:
    state.show_error(exc, "Cannot read the runs: ")
    st.stop()
if not groups:
    st.info(EMPTY, icon=":material/info:")
    st.stop()

# ------------------------------------------------------------------ choices
labels = list(groups)
label = selection.headline(groups, data_path)
if len(labels) > 1:
    label = st.selectbox("Compare runs trained with", labels, index=labels.index(label),
                         key="roi_settings",
                         help="The students of one comparison: runs with identical settings.")
comparison = groups[label]
strategies = selection.by_strategy(comparison)
student = selection.best_student(comparison)
seeds = strategies[student]
left, right = st.columns([2, 1])
left.markdown(
    f"**Priced student: {state.strategy_label(student)}**  \n"
    f"{selection.mean_accuracy(seeds):.1%} test accuracy over {len(seeds)} "
    f"seed{'s' if len(seeds) != 1 else ''}: the best strategy of this comparison. Every "
    "strategy trains the same architecture, so size and speed are the same for all of them.")
threads = right.number_input(
    "Torch threads while timing", min_value=1, max_value=max(1, os.cpu_count() or 1), value=1,
    step=1, key="roi_threads",
    help="Both models are timed with this many threads; it is recorded with the result.")

st.subheader("Your assumptions")
c1, c2, c3 = st.columns(3)
requests = c1.number_input("Predictions per month (your traffic)", min_value=0,
                           value=10_000_000, step=1_000_000, format="%d", key="roi_requests")
price = c2.number_input("Cost per hour of the serving machine ($)", min_value=0.0, value=0.10,
                        step=0.05, format="%.2f", key="roi_price",
                        help="Also prices the training of the student (payback).")
utilisation = c3.slider("Utilisation (busy share of billed time)", min_value=5, max_value=100,
                        value=50, step=5, format="%d%%", key="roi_utilisation")
st.caption(f"Cost model: {roi.COST_MODEL_TEXT}.")

# ------------------------------------------------------------------ measure
run = selection.closest_to_mean(seeds)
try:
    assumptions = roi.CostAssumptions(requests_per_month=float(requests),
                                      cost_per_hour=float(price),
                                      utilisation=utilisation / 100)
    st.session_state[state.ROI_ASSUMPTIONS] = assumptions  # the Overview and its report follow
    base = state.roi_measurement(data_path, run.id, int(threads),
                                 again=st.session_state.pop(AGAIN, False))
    doc = roi.with_assumptions(base, assumptions)
    table = roi.strategy_points(doc, comparison)
except KDCoreError as exc:
    state.show_error(exc, "Cannot measure: ")
    st.stop()

t, s, cost = doc["teacher"], doc["student"], doc["cost"]
st.subheader("The answer")
if doc["negligible"]:
    st.warning(
        f"**Serving cost is negligible at this traffic**: the teacher costs "
        f"{format_money(cost['teacher_monthly'])} a month at {requests:,} predictions, so a "
        "saving on that bill is no reason to switch. What counts is payback: how many "
        "predictions before the student repays its training, then size, speed and accuracy.",
        icon=":material/savings:")
    payback_row(doc)
    money_rows(doc, student)
else:
    money_rows(doc, student)
    payback_row(doc)
st.info(doc["summary"], icon=":material/lightbulb:")
st.download_button(
    "Download the report (HTML)", key="roi_download", icon=":material/download:",
    data=partial(report_download, store, bundle=data_path, assumptions=assumptions,
                 roi_doc=base, threads=int(threads),
                 run_ids=None if label == selection.headline(groups, data_path)
                 else [r.id for r in comparison]),
    file_name="kdcore-roi-report.html", mime="text/html", on_click="ignore",
    help="The whole report of this comparison as one HTML file that opens offline, with this "
         "page's measurement priced under the assumptions entered here.")

# ------------------------------------------------------------------ size, speed, accuracy
st.subheader("Size, speed and accuracy")
m1, m2, m3, m4 = st.columns(4)
m1.metric("Smaller (parameters)", f"{doc['params_ratio']:,.0f}×",
          delta=f"{s['params']:,} vs {t['params']:,} parameters", delta_color="off",
          delta_arrow="off",
          help=f"On disk: {format_bytes(s['size_bytes'])} vs {format_bytes(t['size_bytes'])} "
               f"({doc['size_ratio']:,.0f}× smaller on disk).")
m2.metric("On disk", format_bytes(s["size_bytes"]),
          delta=f"vs {format_bytes(t['size_bytes'])} for the teacher", delta_color="off",
          delta_arrow="off", help="Bytes of the saved weights (torch state_dict).")
m3.metric("Faster per request", f"{doc['speedup']:,.1f}×",
          delta=f"{s['latency_ms_p50']:.3f} vs {t['latency_ms_p50']:.3f} ms (torch, median)",
          delta_color="off", delta_arrow="off")
m4.metric("Accuracy change", f"{doc['accuracy_change'] * 100:+.1f} pts",
          delta=f"{s['accuracy']:.1%} vs {t['accuracy']:.1%}", delta_color="off",
          delta_arrow="off")

st.markdown("**Latency per call**, median over the measurements and its 95% interval")
st.dataframe(latency_table(doc), hide_index=True, width="stretch")
with st.expander("Every measured figure (as `kdcore roi` prints them)"):
    st.dataframe(roi.roi_table(doc), hide_index=True, width="stretch")
m, counts = doc["measurement"], doc["measurements"]
st.caption(f"Measured student: run `{doc['run_id']}` ({state.strategy_label(doc['strategy'])}); "
           f"accuracy is the mean over seeds {', '.join(str(x) for x in s['seeds'])}. Timing: "
           f"the whole measurement {counts['count']} times, each {counts['calls_each']} calls "
           f"per model at batch 1 and {counts['serving_calls_each']} at batch "
           f"{counts['serving_batch']}, {m['threads']} thread(s), {m['device']}, torch "
           f"{m['torch']}, ONNX Runtime {m['onnxruntime']}; the models are called alternately "
           "so background load slows them alike.")
if st.button("Measure again", icon=":material/refresh:", key="roi_remeasure"):
    st.session_state[AGAIN] = True
    st.rerun()

# ------------------------------------------------------------------ charts
left, right = st.columns(2)
left.plotly_chart(figures.roi_scatter(table, "params", student), key="roi_size",
                  width="stretch")
right.plotly_chart(figures.roi_scatter(table, "latency_ms_p50", student), key="roi_latency",
                   width="stretch")
st.caption("Every strategy trains the same small architecture, so the students share one "
           "size and one latency: distillation changes what the student knows, not what it "
           "costs to run.")
st.plotly_chart(figures.cost_per_million_bars(doc["cost_per_million"], student), key="roi_cost",
                width="stretch")
a = cost["assumptions"]
st.caption(f"Assumptions: {a['requests_per_month']:,.0f} predictions a month, "
           f"{format_money(a['cost_per_hour'])} per machine-hour, {a['utilisation']:.0%} "
           f"utilisation, the median latency at batch 1. Teacher "
           f"{cost['teacher_machine_hours']:,.2f} machine-hours a month, student "
           f"{cost['student_machine_hours']:,.2f}. No minimum bill: a machine kept on all month "
           "costs at least its hours, whatever the traffic.")
