"""Results: what each training strategy did to accuracy and to the teacher's mistakes.

Only finished (``done``) runs are compared, and only runs trained with the same settings
(bundle, epochs, temperature, lambda, ...): a comparison across settings would mix two
experiments. Accuracy means the last epoch's; best-epoch accuracy is shown apart, labelled.
"""

from __future__ import annotations

from math import nan
from pathlib import Path

import pandas as pd
import streamlit as st

from kdcore.errors import KDCoreError
from kdcore.learning.strategies import strategy_order
from kdcore.store import selection
from kdcore.store.runs import STATUSES, Run
from kdcore.value import figures
from kdcore.value.before_after import before_after, shown_students
from kdcore.value.compare import BASELINE, summarise
from kdcore_app import state

BEST_EPOCH_NOTE = ("Best-epoch accuracy picks, per run, the epoch that scored highest on the "
                   "test set: it chooses on the test data, so it is optimistic. Compare "
                   "strategies on last-epoch accuracy.")
EMPTY = ("No training runs yet. Go to **Overview** and press **Run the demo**, or run "
         "`kdcore demo` in a terminal; to train your own, use the **Train** page.")


def _describe(label: str, runs: list[Run]) -> str:
    n = len({r.strategy for r in runs})
    return (f"{label} ({n} strateg{'ies' if n > 1 else 'y'}, "
            f"{len(runs)} run{'s' * (len(runs) > 1)})")


# --------------------------------------------------------------------------- cached loaders


@st.cache_data(show_spinner=False, max_entries=32)
def epoch_frame(workspace: str, runs: tuple[tuple[str, str, int], ...]) -> pd.DataFrame:
    """Per-epoch metrics of finished runs ((id, strategy, seed), ...) in one long frame."""
    store = state.store()
    frames = []
    for run_id, strategy, seed in runs:
        frame = store.epochs(run_id)
        frames.append(frame.assign(strategy=strategy, seed=seed, run_id=run_id))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["epoch", "test_accuracy", "strategy", "seed", "run_id"])


# --------------------------------------------------------------------------- sections


def render_headline(summary: dict, best_name: str) -> None:
    entries = summary["strategies"]
    teacher = summary.get("teacher_test_accuracy")
    best = entries[best_name]
    cols = st.columns(4)
    cols[0].metric("Teacher test accuracy", "—" if teacher is None else f"{teacher:.1%}")
    cols[1].metric(
        f"Best student: {best_name}", f"{best['mean']:.1%}",
        delta=None if teacher is None else f"{100 * (best['mean'] - teacher):+.1f} pts vs teacher",
        help=f"Last-epoch test accuracy, mean over {len(best['seeds'])} seeds: the bias-aware "
             "strategy with the best mean (vanilla KD and ce are its baselines)")
    if BASELINE in entries:
        kd = entries[BASELINE]
        cols[2].metric("Vanilla KD", f"{kd['mean']:.1%}",
                       help=f"Last-epoch test accuracy, mean over {len(kd['seeds'])} seeds")
        if kd["bias_inheritance"] is not None and best["bias_inheritance"] is not None:
            cols[3].metric(
                "Teacher mistakes copied", f"{best['bias_inheritance']:.0%}",
                delta=f"{100 * (best['bias_inheritance'] - kd['bias_inheritance']):+.0f} pts vs KD",
                delta_color="inverse",
                help=f"By {best_name}: of the test samples the teacher gets wrong, the share "
                     "the student gets wrong with the same wrong class")
    st.info(summary["verdict"], icon=":material/balance:")
    fewest = min(len(e["seeds"]) for e in entries.values())
    if fewest < 3:
        st.warning(f"Some strategies have only {fewest} seed{'s' * (fewest > 1)}: differences "
                   "that small samples show are often noise. Train 3 or more seeds per strategy "
                   "on the **Train** page before trusting them.", icon=":material/warning:")


def render_comparison(summary: dict, best_name: str) -> None:
    st.subheader("Accuracy by strategy")
    left, right = st.columns(2)
    left.plotly_chart(figures.strategy_accuracy_bars(summary, best_name),
                      key="results_accuracy_chart")
    if any(e.get("delta_vs_kd") for n, e in summary["strategies"].items() if n != BASELINE):
        right.plotly_chart(figures.delta_vs_kd_chart(summary), key="results_delta_chart")
    else:
        right.info("Train **kd** on the same seeds to see each strategy's gain over vanilla KD.",
                   icon=":material/info:")
    rows = []
    for name in strategy_order(list(summary["strategies"])):
        entry = summary["strategies"][name]
        delta = entry.get("delta_vs_kd")
        ci = delta.get("ci95") if delta else None
        rows.append({
            "strategy": name,
            "seeds": len(entry["seeds"]),
            "accuracy": 100 * entry["mean"],
            "std": 100 * entry["std"],
            "best_epoch": 100 * entry["best_epoch_mean"],
            "delta": nan if delta is None or name == BASELINE else 100 * delta["mean"],
            "interval": (f"{100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}"
                         if ci and name != BASELINE else ""),
            "inheritance": (nan if entry["bias_inheritance"] is None
                            else 100 * entry["bias_inheritance"]),
            "params": entry.get("student_params"),
        })
    st.dataframe(
        pd.DataFrame(rows), hide_index=True, key="results_summary_table", placeholder="—",
        column_config={
            "strategy": "Strategy",
            "seeds": "Seeds",
            "accuracy": st.column_config.NumberColumn(
                "Accuracy (last epoch)", format="%.1f%%",
                help="Mean over seeds of the accuracy at the end of training."),
            "std": st.column_config.NumberColumn("± std", format="%.1f"),
            "best_epoch": st.column_config.NumberColumn(
                "Best epoch (optimistic)", format="%.1f%%", help=BEST_EPOCH_NOTE),
            "delta": st.column_config.NumberColumn(
                "vs KD (points)", format="%+.1f",
                help="Mean of per-seed differences to vanilla KD on the same seeds."),
            "interval": st.column_config.TextColumn(
                "95% interval", help="If it includes 0, the difference is not clear."),
            "inheritance": st.column_config.NumberColumn(
                "Mistakes copied", format="%.0f%%",
                help="Of the test samples the teacher gets wrong, the share the student gets "
                     "wrong with the same wrong class."),
            "params": st.column_config.NumberColumn("Parameters", format="%d",
                                                    help="Size of the student model."),
        })
    st.caption("Error bars: ± one standard deviation over seeds. " + BEST_EPOCH_NOTE)


def render_per_class(group: list[Run], summary: dict, best_name: str) -> None:
    st.subheader("Per class: before (teacher) and after (students)")
    options = strategy_order(list(summary["strategies"]))
    chosen = st.multiselect("Students to show", options, default=shown_students(group),
                            key="results_class_strategies")
    try:
        frame = before_after(state.store(), group, chosen)
    except KDCoreError as exc:
        state.show_error(exc, prefix="The teacher's per-class accuracy: ")
        return
    st.plotly_chart(figures.per_class_before_after(
        frame, highlight=best_name,
        title="Per-class test accuracy: teacher (before) vs students (after)"),
        key="results_class_chart")
    if chosen:
        st.plotly_chart(figures.per_class_change(frame, best_name),
                        key="results_class_change_chart")
    st.caption("Student accuracy is the mean over seeds, at the last epoch, on the held-out "
               "test split.")


def render_inheritance(summary: dict) -> None:
    st.subheader("Teacher mistakes the students copy")
    if all(e.get("bias_inheritance") is None for e in summary["strategies"].values()):
        st.info("The teacher makes no mistake on the test split, so there is nothing to copy.",
                icon=":material/info:")
        return
    st.plotly_chart(figures.bias_inheritance_bars(summary), key="results_inheritance_chart")
    st.caption("Of the test samples the teacher gets wrong, the share the student gets wrong "
               "with the same wrong class. **ce** never sees the teacher: its value is how "
               "often a student makes those mistakes on its own.")


def render_curves(group: list[Run], summary: dict, best_name: str) -> None:
    st.subheader("Learning curves")
    left, right = st.columns([3, 1])
    options = strategy_order(list(summary["strategies"]))
    chosen = left.multiselect("Strategies", options, default=options,
                              key="results_curve_strategies")
    mode = right.radio("Show", ["Mean and range", "Each seed"], key="results_curve_mode",
                       horizontal=True)
    runs = tuple((r.id, r.strategy, r.seed) for r in group if r.strategy in chosen)
    epochs = epoch_frame(str(state.store().workspace), runs)
    if epochs.empty or "test_accuracy" not in epochs:
        st.info("No per-epoch metrics for these runs.", icon=":material/info:")
        return
    st.plotly_chart(figures.learning_curves(epochs, per_seed=mode == "Each seed",
                                            highlight=best_name), key="results_curves_chart")


def render_run_table(runs: list[Run]) -> None:
    st.subheader("All runs")
    frame = state.store().to_frame(runs)
    frame["bundle"] = frame["bundle"].map(lambda p: Path(p).name if p else "")
    frame["epochs"] = [r.config.get("epochs") for r in runs]
    frame["created"] = pd.to_datetime(frame["created_at"], utc=True).dt.tz_convert(None)
    cols = st.columns(3)
    filters = {
        "strategy": cols[0].multiselect("Strategy", strategy_order(
            sorted(frame["strategy"].dropna().unique())), key="results_filter_strategy",
            placeholder="all"),
        "status": cols[1].multiselect("Status", list(STATUSES), key="results_filter_status",
                                      placeholder="all"),
        "bundle": cols[2].multiselect("Bundle", sorted(frame["bundle"].unique()),
                                      key="results_filter_bundle", placeholder="all"),
    }
    for column, wanted in filters.items():
        if wanted:
            frame = frame[frame[column].isin(wanted)]
    for column in ("test_accuracy", "best_test_accuracy", "bias_inheritance"):
        frame[column] = 100 * frame[column]
    st.dataframe(
        frame, hide_index=True, key="results_runs_table", placeholder="—",
        column_order=["created", "strategy", "seed", "status", "test_accuracy",
                      "best_test_accuracy", "bias_inheritance", "epochs", "bundle", "duration_s",
                      "error", "id"],
        column_config={
            "created": st.column_config.DatetimeColumn("Created (UTC)",
                                                       format="YYYY-MM-DD HH:mm:ss"),
            "strategy": "Strategy", "seed": "Seed", "epochs": "Epochs", "bundle": "Bundle",
            "status": "Status",
            "test_accuracy": st.column_config.NumberColumn("Test accuracy (last epoch)",
                                                           format="%.1f%%"),
            "best_test_accuracy": st.column_config.NumberColumn(
                "Best epoch (optimistic)", format="%.1f%%", help=BEST_EPOCH_NOTE),
            "bias_inheritance": st.column_config.NumberColumn(
                "Mistakes copied", format="%.0f%%",
                help="Share of the teacher's test mistakes the student repeats."),
            "duration_s": st.column_config.NumberColumn("Took", format="%.1f s"),
            "error": "Error", "id": "Run id",
        })
    st.caption(f"{len(frame)} of {len(runs)} runs shown. `kdcore runs` lists them in a terminal.")


def reset_strategy_choices() -> None:
    """Another comparison has other strategies: start its pickers from their defaults."""
    for key in ("results_class_strategies", "results_curve_strategies"):
        st.session_state.pop(key, None)


# --------------------------------------------------------------------------- page


st.title("Results: before and after")
st.caption("How each training strategy changes the student's accuracy and how many of the "
           "teacher's mistakes it inherits. Only finished runs with the same settings are "
           "compared.")
try:
    all_runs = state.store().list()
except KDCoreError as exc:
    state.show_error(exc)
    st.stop()
if not all_runs:
    st.info(EMPTY, icon=":material/info:")
    st.stop()

groups = selection.comparable_groups(all_runs)
training = len(selection.pending(all_runs))
if training:
    st.caption(f"{training} run{'s' * (training > 1)} still training (see **Train**); they join "
               "the comparison when done.")
if not groups:
    st.info("No run has finished yet. Follow the runs on the **Train** page, or press **Run "
            "the demo** on **Overview** (or run `kdcore demo`).", icon=":material/info:")
else:
    labels = list(groups)
    label = st.selectbox("Compare runs trained with", labels, key="results_settings",
                         index=labels.index(selection.headline(groups) or labels[0]),
                         format_func=lambda key: _describe(key, groups[key]),
                         on_change=reset_strategy_choices,
                         help="Runs are compared only with runs of identical settings.")
    group = groups[label]
    try:
        summary = summarise(group)
    except (KDCoreError, KeyError) as exc:
        state.show_error(exc, prefix="Cannot summarise these runs: ")
        st.stop()
    best_name = selection.best_student(group)
    render_headline(summary, best_name)
    render_comparison(summary, best_name)
    render_per_class(group, summary, best_name)
    render_inheritance(summary)
    render_curves(group, summary, best_name)
render_run_table(all_runs)
