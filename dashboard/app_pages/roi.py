"""ROI: is the student worth it? Measured size, speed and serving cost against the teacher.

The engine (``kdcore.value.roi``) measures both models in this process on this machine; the page
only chooses the student, takes the cost assumptions as inputs and draws the result.
"""

from __future__ import annotations

import os

import streamlit as st

from kdcore.errors import KDCoreError
from kdcore.store import selection
from kdcore.value import figures, formatting, roi
from kdcore_app import state

EMPTY = ("No students were trained yet, so there is nothing to weigh against the teacher. "
         "Go to **Overview** and press **Run the demo**, or run `kdcore demo` in a terminal.")


@st.cache_data(show_spinner="Timing the teacher and the student on this machine…",
               max_entries=16)
def measured(workspace: str, bundle_path: str, run_id: str, threads: int, nonce: int) -> dict:
    """The measured ROI document (default assumptions); ``nonce`` forces a new measurement."""
    return roi.roi(state.store(), bundle_path, run_id, threads=threads)


st.title("Is the student worth it?")
st.markdown(
    "The teacher and a trained student, **measured now on this machine, in the same process**: "
    "size on disk, time to answer one request (median and 95th percentile over hundreds of "
    "calls), throughput on batches of 256, and accuracy over the training seeds. The cost "
    "model turns the median latency into a monthly serving bill; change its assumptions "
    "below, every number follows.")

store = state.store()
choices = state.bundle_choices()
bundle_name = (st.selectbox("Bundle", list(choices), key="roi_bundle") if len(choices) > 1
               else next(iter(choices)))
try:
    bundle = state.source_bundle(bundle_name)
    groups = selection.comparable_groups(selection.on_bundle(store.list(status="done"),
                                                             bundle.path))
except KDCoreError as exc:
    state.show_error(exc, "Cannot read the runs: ")
    st.stop()
if not groups:
    st.info(EMPTY, icon=":material/info:")
    st.stop()

# ------------------------------------------------------------------ choices
labels = list(groups)
label = selection.headline(groups, bundle.path)
if len(labels) > 1:
    label = st.selectbox("Compare runs trained with", labels, index=labels.index(label),
                         key="roi_settings",
                         help="The students of one comparison: runs with identical settings.")
comparison = groups[label]
strategies = selection.by_strategy(comparison)
means = {name: selection.mean_accuracy(runs) for name, runs in strategies.items()}
names = list(strategies)
left, right = st.columns([2, 1])
student = left.selectbox(
    "Student", names, index=names.index(selection.best_student(comparison)), key="roi_student",
    format_func=lambda n: f"{n} — {means[n]:.1%} over {len(strategies[n])} seed"
                          f"{'s' if len(strategies[n]) != 1 else ''}",
    help="Default: the bias-aware strategy with the best mean accuracy (vanilla KD and ce are "
         "its baselines). Every strategy trains the same student architecture, so size and "
         "speed are the same; accuracy differs.")
threads = right.number_input(
    "Torch threads while timing", min_value=1, max_value=max(1, os.cpu_count() or 1), value=1,
    step=1, key="roi_threads",
    help="Both models are timed with this many threads; it is recorded with the result.")

st.subheader("Cost assumptions")
c1, c2, c3 = st.columns(3)
requests = c1.number_input("Requests per month", min_value=0, value=10_000_000,
                           step=1_000_000, format="%d", key="roi_requests")
price = c2.number_input("Cost per hour of the serving machine ($)", min_value=0.0, value=0.10,
                        step=0.05, format="%.2f", key="roi_price")
utilisation = c3.slider("Utilisation (busy share of billed time)", min_value=5, max_value=100,
                        value=50, step=5, format="%d%%", key="roi_utilisation")
st.caption(f"Cost model: {roi.COST_MODEL_TEXT}.")

# ------------------------------------------------------------------ measure
run = selection.closest_to_mean(strategies[student])
nonce = st.session_state.get("roi_nonce", 0)
try:
    assumptions = roi.CostAssumptions(requests_per_month=float(requests),
                                      cost_per_hour=float(price),
                                      utilisation=utilisation / 100)
    base = measured(str(store.workspace), str(bundle.path), run.id, int(threads), nonce)
    doc = roi.with_assumptions(base, assumptions)
    table = roi.strategy_points(doc, comparison)
except KDCoreError as exc:
    state.show_error(exc, "Cannot measure: ")
    st.stop()

st.subheader("The result")
st.info(doc["summary"], icon=":material/lightbulb:")
m1, m2, m3, m4 = st.columns(4)
m1.metric("Smaller (bytes on disk)", f"{doc['size_ratio']:,.0f}×",
          delta=f"{formatting.format_bytes(doc['student']['size_bytes'])} vs "
                f"{formatting.format_bytes(doc['teacher']['size_bytes'])}",
          delta_color="off", delta_arrow="off")
m2.metric("Faster per request", f"{doc['speedup']:,.1f}×",
          delta=f"{doc['student']['latency_ms_p50']:.3f} vs "
                f"{doc['teacher']['latency_ms_p50']:.3f} ms (median)",
          delta_color="off", delta_arrow="off")
m3.metric("Accuracy change", f"{doc['accuracy_change'] * 100:+.1f} pts",
          delta=f"{doc['student']['accuracy']:.1%} vs {doc['teacher']['accuracy']:.1%}",
          delta_color="off", delta_arrow="off")
m4.metric("Saving a month", formatting.format_money(doc["cost"]["saving_monthly"]),
          delta=f"{formatting.format_money(doc['cost']['student_monthly'])} vs "
                f"{formatting.format_money(doc['cost']['teacher_monthly'])}",
          delta_color="off", delta_arrow="off")

st.dataframe(roi.roi_table(doc), hide_index=True, width="stretch")
m = doc["measurement"]
st.caption(f"Measured student: run `{doc['run_id']}` ({doc['strategy']}); accuracy is the mean "
           f"over seeds {', '.join(str(s) for s in doc['student']['seeds'])}. Timing: "
           f"{m['latency_calls']} calls at batch 1 after {m['warmup_calls']} warm-up calls, "
           f"{m['throughput_calls']} at batch {m['throughput_batch']}, {m['threads']} "
           f"thread(s), {m['device']}, torch {m['torch']}; the two models are called "
           "alternately so background load slows both alike.")
if st.button("Measure again", icon=":material/refresh:", key="roi_remeasure"):
    st.session_state["roi_nonce"] = nonce + 1
    st.rerun()

left, right = st.columns(2)
left.plotly_chart(figures.roi_scatter(table, "size_bytes", student), key="roi_size",
                  width="stretch")
right.plotly_chart(figures.roi_scatter(table, "latency_ms_p50", student), key="roi_latency",
                   width="stretch")
st.caption("Every strategy trains the same small architecture, so the students share one "
           "size and one latency: distillation changes what the student knows, not what it "
           "costs to run.")

st.plotly_chart(figures.roi_cost_bars(doc["cost"], doc["strategy"]), key="roi_cost",
                width="stretch")
a = doc["cost"]["assumptions"]
st.caption(f"Assumptions: {a['requests_per_month']:,.0f} requests a month, "
           f"{formatting.format_money(a['cost_per_hour'])} per machine-hour, "
           f"{a['utilisation']:.0%} utilisation, the median latency at batch 1. Teacher "
           f"{doc['cost']['teacher_machine_hours']:,.2f} machine-hours a month, student "
           f"{doc['cost']['student_machine_hours']:,.2f}. No minimum bill: a machine kept on "
           "all month costs at least its hours, whatever the traffic.")
