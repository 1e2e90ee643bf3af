"""Results: what each training strategy did to accuracy and to the teacher's mistakes.

Only finished (``done``) runs are compared, and only runs trained with the same settings
(bundle, epochs, temperature, lambda, ...): a comparison across settings would mix two
experiments. Accuracy means the last epoch's; best-epoch accuracy is shown apart, labelled.
"""

from __future__ import annotations

import json
from math import nan
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from kdcore.analysis.calibration import probabilities
from kdcore.analysis.decision import CE
from kdcore.analysis.metrics import error_map
from kdcore.data.bundles import load_dataset
from kdcore.errors import KDCoreError
from kdcore.learning.strategies import plain_name, strategy_order
from kdcore.store import selection
from kdcore.store.runs import STATUSES, Run
from kdcore.value import figures
from kdcore.value.before_after import before_after, shown_students
from kdcore.value.compare import BASELINE, summarise
from kdcore.value.predictions import load_test_predictions
from kdcore_app import state

BEST_EPOCH_NOTE = ("Best-epoch accuracy picks, per run, the epoch that scored highest on the "
                   "test set: it chooses on the test data, so it is optimistic. Compare "
                   "strategies on last-epoch accuracy.")
NO_VALUE = "—"
LABELS_ALONE = "train on labels alone"
MAX_IMAGES = 12
MAX_ROWS = 2000  # sample rows listed for one error-map cell
EMPTY = ("No training runs yet. Go to **Overview** and press **Run the demo**, or run "
         "`kdcore demo` in a terminal; to train your own, use the **Train** page.")


def _pts(x: float | None) -> str:
    return NO_VALUE if x is None else f"{100 * x:+.1f}"


def _interval(delta: dict | None) -> str:
    """"+0.3 to +1.2" in points, or "—" without an interval."""
    ci = (delta or {}).get("ci95")
    return f"{_pts(ci[0])} to {_pts(ci[1])}" if ci else NO_VALUE


def _answer(value: bool | None) -> str:
    return "Yes" if value is True else "No" if value is False else "Cannot tell"


def _student_label(name: str) -> str:
    """How a page names the best strategy: ce is not a distilled student, say so plainly."""
    return f"Best: {LABELS_ALONE} ({CE})" if name == CE else f"Best student: {name}"


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


@st.cache_data(show_spinner="Reading the saved test predictions…", max_entries=64)
def predictions(workspace: str, run_id: str) -> dict:
    """One finished run's saved test predictions (student and teacher logits, labels, class
    names); finished runs never change, so the run id is the cache key."""
    store = state.store()
    preds = load_test_predictions(store, store.get(run_id))
    return {"logits": np.asarray(preds.logits), "labels": np.asarray(preds.labels),
            "teacher_logits": np.asarray(preds.teacher_logits),
            "class_names": [str(c) for c in preds.class_names]}


@st.cache_resource(show_spinner="Loading the test inputs…", max_entries=4)
def test_inputs(path: str, options: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The test split's sample ids and inputs as images (n, h, w), when the dataset has them;
    (None, None) when it cannot be read any more (moved or deleted since training)."""
    if not path:
        return None, None
    try:
        data = load_dataset(path, **json.loads(options))
        ids = data.sample_ids("test")
        shape = data.image_shape
        images = None
        if shape:
            x = data.x("test")
            if int(np.prod(shape)) == x[0].size:
                images = x.reshape(len(x), *shape[-2:])
        return ids, images
    except (KDCoreError, OSError, ValueError):
        return None, None


def median_run(runs: list[Run]) -> Run:
    """Of one strategy's seeds, the run with the median accuracy (the lower of the middle two
    for an even count; the lower seed on a tie)."""
    ordered = sorted(runs, key=lambda r: (float(r.metrics["test_accuracy"]), r.seed or 0))
    return ordered[(len(ordered) - 1) // 2]


def render_decision(summary: dict, best_name: str) -> None:
    """The verdict, then one card per question: distil at all? which strategy? does the
    student beat its teacher?"""
    verdict = summary["verdict"]
    head, sep, rest = verdict.partition(":")
    st.info(f"**{head}:** {rest.strip()}" if sep and len(head) < 20 else verdict,
            icon=":material/balance:")
    decision = summary.get("decision") or {}
    entries = summary["strategies"]
    best = decision.get("best_strategy") or best_name
    adjustment = decision.get("adjustment")
    cols = st.columns(3)
    vs_ce = decision.get("delta_vs_ce")
    distil_delta = None
    if vs_ce:
        ci = vs_ce.get("ci95")
        distil_delta = (f"{_pts(vs_ce['mean'])} pts vs ce "
                        + (f"[{_pts(ci[0])}, {_pts(ci[1])}]" if ci else "(no interval)")
                        + (f", {adjustment.split(', ', 1)[-1]}" if adjustment else ""))
    cols[0].metric(
        "Distil? (against labels alone)", _answer(decision.get("distil")), delta=distil_delta,
        delta_color="off", delta_arrow="off",
        help=f"Does the best distilled student ({decision.get('best_distilled') or NO_VALUE}) "
             "beat ce, the same student trained on the labels alone? Paired over the same "
             f"seeds, a {(decision.get('ci_level') or 0.95):.1%} interval, widened for picking "
             "the best of N strategies after the fact (Holm correction) so that the family of "
             "comparisons holds at 95%. 'Cannot tell' when "
             "the interval includes 0, with fewer than 2 seeds or no spread.")
    if best and best in entries:
        entry = entries[best]
        cols[1].metric(
            "Best strategy", best,
            delta=(f"{LABELS_ALONE}: {entry['mean']:.1%}" if best == CE
                   else f"{entry['mean']:.1%} test accuracy"),
            delta_color="off", delta_arrow="off",
            help=f"The highest mean last-epoch test accuracy over {len(entry['seeds'])} seeds"
                 + (". ce trains on the labels alone: distillation does not pay here."
                    if best == CE else "."))
        cols[1].caption(state.strategy_label(best))
        vs_teacher = decision.get("delta_vs_teacher") or entry.get("delta_vs_teacher")
        cols[2].metric(
            "Beats the teacher?", _answer(decision.get("beats_teacher")),
            delta=(f"{_pts(vs_teacher['mean'])} pts vs teacher, 95% interval "
                   f"{_interval(vs_teacher)}" if vs_teacher else None),
            delta_color="off", delta_arrow="off",
            help=f"{best} against the teacher on the same test samples, paired over seeds.")
    else:
        cols[1].metric("Best strategy", NO_VALUE)
        cols[2].metric("Beats the teacher?", _answer(None))
    if decision.get("note"):
        st.caption(decision["note"])
    fewest = min(len(e["seeds"]) for e in entries.values())
    if fewest < 3:
        st.warning(f"Some strategies have only {fewest} seed{'s' * (fewest > 1)}: differences "
                   "that small samples show are often noise. Train 3 or more seeds per strategy "
                   "on the **Train** page before trusting them.", icon=":material/warning:")



def render_headline(summary: dict, best_name: str) -> None:
    st.subheader("Today's comparison")
    entries = summary["strategies"]
    teacher = summary.get("teacher_test_accuracy")
    best = entries[best_name]
    cols = st.columns(4)
    cols[0].metric("Teacher test accuracy", "—" if teacher is None else f"{teacher:.1%}")
    cols[1].metric(
        _student_label(best_name), f"{best['mean']:.1%}",
        delta=None if teacher is None else f"{100 * (best['mean'] - teacher):+.1f} pts vs teacher",
        help=f"Last-epoch test accuracy, mean over {len(best['seeds'])} seeds: the strategy "
             "with the best mean, ce (labels alone) included")
    if BASELINE in entries:
        kd = entries[BASELINE]
        cols[2].metric("Vanilla KD", f"{kd['mean']:.1%}",
                       help=f"Last-epoch test accuracy, mean over {len(kd['seeds'])} seeds")
    if best["bias_inheritance"] is not None:
        excess = best.get("excess_inheritance")
        kd_share = entries.get(BASELINE, {}).get("bias_inheritance")
        cols[3].metric(
            "Teacher mistakes copied", f"{100 * best['bias_inheritance']:.1f}%",
            delta=("the floor (no teacher)" if best_name == CE
                   else f"{100 * excess:+.1f} pts over ce's floor" if excess is not None
                   else f"{100 * (best['bias_inheritance'] - kd_share):+.1f} pts vs KD"
                   if kd_share is not None and best_name != BASELINE else None),
            delta_color="off" if best_name == CE else "inverse",
            delta_arrow="off" if best_name == CE else "auto",
            help=f"By {best_name}: of the test samples the teacher gets wrong, the share the "
                 "student gets wrong with the same wrong class. ce never sees the teacher: its "
                 "share is the floor, what a student copies on its own; the excess over it is "
                 "what the teacher passed on.")


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
            "in words": plain_name(name),
            "seeds": len(entry["seeds"]),
            "accuracy": 100 * entry["mean"],
            "std": 100 * entry["std"] if len(entry["seeds"]) > 1 else nan,  # one seed: "—"
            "best_epoch": 100 * entry["best_epoch_mean"],
            "delta": nan if delta is None or name == BASELINE else 100 * delta["mean"],
            "interval": (f"{100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}"
                         if ci and name != BASELINE else None),
            "delta_ce": (nan if not entry.get("delta_vs_ce") or name == CE
                         else 100 * entry["delta_vs_ce"]["mean"]),
            "interval_ce": (None if name == CE or _interval(entry.get("delta_vs_ce")) == NO_VALUE
                            else _interval(entry.get("delta_vs_ce"))),
            "inheritance": (nan if entry["bias_inheritance"] is None
                            else 100 * entry["bias_inheritance"]),
            "excess": (nan if entry.get("excess_inheritance") is None or name == CE
                       else 100 * entry["excess_inheritance"]),
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
            "std": st.column_config.NumberColumn(
                "± std (points)", format="%.1f",
                help="Standard deviation over seeds; — with one seed (no spread)."),
            "best_epoch": st.column_config.NumberColumn(
                "Best epoch (optimistic)", format="%.1f%%", help=BEST_EPOCH_NOTE),
            "delta": st.column_config.NumberColumn(
                "vs KD (points)", format="%+.1f",
                help="Mean of per-seed differences to vanilla KD on the same seeds."),
            "interval": st.column_config.TextColumn(
                "95% interval (vs KD)", help="If it includes 0, the difference is not clear."),
            "delta_ce": st.column_config.NumberColumn(
                "vs ce (points)", format="%+.1f",
                help="Mean of per-seed differences to ce, the student trained on the labels "
                     "alone, on the same seeds: does distillation pay at all?"),
            "interval_ce": st.column_config.TextColumn(
                "95% interval (vs ce)", help="If it includes 0, the difference is not clear."),
            "inheritance": st.column_config.NumberColumn(
                "Mistakes copied", format="%.1f%%",
                help="Of the test samples the teacher gets wrong, the share the student gets "
                     "wrong with the same wrong class."),
            "excess": st.column_config.NumberColumn(
                "Excess over ce (points)", format="%+.1f",
                help="Mistakes copied minus ce's share: ce never sees the teacher, so its "
                     "share is the floor (hard samples); the excess is what the teacher passed "
                     "on."),
            "params": st.column_config.NumberColumn("Parameters", format="%d",
                                                    help="Size of the student model."),
        })
    st.caption("Error bars: ± one standard deviation over seeds. " + BEST_EPOCH_NOTE)


def _class_rows(items: list[dict]) -> pd.DataFrame:
    """A "classes it hurts / fixes" list as a readable frame."""
    return pd.DataFrame([{
        "class": str(item.get("class")),
        "against": figures.AGAINST.get(item.get("against"), item.get("against") or NO_VALUE),
        "delta": nan if not item.get("delta") else 100 * item["delta"]["mean"],
        "interval": None if _interval(item.get("delta")) == NO_VALUE else _interval(
            item.get("delta")),
        "p": item.get("p_adjusted"),
    } for item in items], columns=["class", "against", "delta", "interval", "p"])


CLASS_COLUMNS = {
    "class": "Class", "against": "Against",
    "delta": st.column_config.NumberColumn("Difference (points)", format="%+.1f"),
    "interval": "95% interval",
    "p": st.column_config.NumberColumn(
        "Adjusted p", format="%.3f",
        help="Benjamini-Hochberg adjusted over the classes of one comparison; below 0.05 is "
             "significant."),
    "significant": st.column_config.CheckboxColumn("Significant"),
}


def render_significance(summary: dict, best_name: str) -> None:
    """Per class: the chosen strategy against ce, kd or the teacher, significance marked; then
    the classes distillation hurts and the classes it fixes."""
    st.subheader("Which classes win and which lose")
    entries = summary["strategies"]
    names = [n for n in strategy_order(list(entries)) if entries[n].get("per_class")]
    if not names:
        st.info("No per-class comparison for these runs: train two or more seeds of ce, kd and "
                "a bias-aware strategy on the same settings.", icon=":material/info:")
        return
    classes = summary.get("classes") or {}
    default = classes.get("strategy") if classes.get("strategy") in names else best_name
    left, right = st.columns([2, 3])
    strategy = left.selectbox("Strategy", names, key="results_sig_strategy",
                              index=names.index(default) if default in names else 0,
                              format_func=state.strategy_label,
                              help="By default the strategy of the hurts / fixes lists below.")
    per_class = entries[strategy]["per_class"]
    options = [a for a in figures.AGAINST if a != strategy
               and any(row.get(f"delta_vs_{a}") for row in per_class)]
    if not options:
        st.info(f"{strategy} has no per-class difference to show: train ce and kd on the same "
                "seeds.", icon=":material/info:")
        return
    against = right.radio("Against", options, horizontal=True, key="results_sig_against",
                          format_func=figures.AGAINST.get,
                          index=(options.index(classes["against"])
                                 if classes.get("against") in options else 0),
                          help="Each comparison's p-values are corrected across classes "
                               "(Benjamini-Hochberg) on their own.")
    st.plotly_chart(figures.per_class_significance(per_class, against or options[0],
                                                   strategy=strategy),
                    key="results_significance_chart")
    against = against or options[0]
    frame = pd.DataFrame([{
        "class": str(row["class"]),
        "delta": (nan if not row.get(f"delta_vs_{against}")
                  else 100 * row[f"delta_vs_{against}"]["mean"]),
        "interval": None if _interval(row.get(f"delta_vs_{against}")) == NO_VALUE
        else _interval(row.get(f"delta_vs_{against}")),
        "p": row.get(f"p_adjusted_vs_{against}"),
        "significant": (row.get(f"p_adjusted_vs_{against}") is not None
                        and row[f"p_adjusted_vs_{against}"] < figures.ALPHA),
    } for row in per_class])
    with st.expander(f"Every class: {strategy} against {figures.AGAINST[against]}"):
        st.dataframe(frame, hide_index=True, key="results_significance_table",
                     placeholder=NO_VALUE, column_config=CLASS_COLUMNS)
    if classes.get("strategy") and classes.get("against"):
        role = "the best distilled student" if classes["against"] == CE else "the best student"
        st.markdown(f"**{classes['strategy']}** ({role}) against "
                    f"**{figures.AGAINST.get(classes['against'], classes['against'])}**, "
                    "significant classes only:")
    hurts, fixes = st.columns(2)
    for column, key, title, none in (
            (hurts, "hurts", "Classes distillation hurts",
             "No class is significantly worse."),
            (fixes, "fixes", "Classes it fixes", "No class is significantly better.")):
        column.markdown(f"**{title}**")
        items = classes.get(key) or []
        if items:
            column.dataframe(_class_rows(items), hide_index=True, key=f"results_{key}_table",
                             placeholder=NO_VALUE, column_config=CLASS_COLUMNS)
        else:
            column.caption(none)
    st.caption("Per class, the paired difference in accuracy over seeds with its 95% interval. "
               "Large green or red points: significant after the Benjamini-Hochberg "
               f"correction across classes (adjusted p < {figures.ALPHA:g}); small grey: not. "
               "Classes with few test samples rarely reach significance.")


def render_error_map(group: list[Run], summary: dict, best_name: str) -> None:
    """Teacher vs student on one seed's test samples, a click lists the samples of a cell."""
    st.subheader("What the student fixes and what it breaks")
    runs = selection.by_strategy(group)
    names = list(runs)
    left, middle, right = st.columns([2, 1, 2])
    strategy = left.selectbox("Student", names, key="results_err_strategy",
                              index=names.index(best_name) if best_name in names else 0,
                              format_func=state.strategy_label)
    by_seed = {r.seed: r for r in runs[strategy]}
    default = median_run(runs[strategy]).seed
    seeds = list(by_seed)
    seed = middle.selectbox(
        "Seed", seeds, index=seeds.index(default), key=f"results_err_seed_{strategy}",
        format_func=lambda s: f"{s} (median accuracy)" if s == default else str(s),
        help="The map is computed per seed; by default the seed with the median accuracy.")
    run = by_seed[seed]
    workspace = str(state.store().workspace)
    try:
        preds = predictions(workspace, run.id)
    except (KDCoreError, OSError, ValueError) as exc:
        state.show_error(exc, prefix=f"The test predictions of run {run.id}: ")
        return
    labels = preds["labels"]
    student, teacher = preds["logits"].argmax(1), preds["teacher_logits"].argmax(1)
    masks = error_map(student, teacher, labels)
    counts = figures.error_map_counts(masks)
    chart_key = f"results_error_map_{strategy}_{seed}"
    chart, pooled = st.columns([3, 2])
    chart.plotly_chart(figures.error_map_chart(counts, strategy=strategy, seed=seed),
                       key=chart_key, on_select="rerun", selection_mode=("points",))
    with pooled:
        st.markdown(f"**Pooled over {len(by_seed)} seed{'s' * (len(by_seed) > 1)}** "
                    "(as in `compare --json`)")
        total = summary["strategies"].get(strategy, {}).get("error_map")
        if total:
            st.dataframe(pd.DataFrame([
                {"cell": label, "samples": total.get(key)}
                for key, label, *_ in figures.ERROR_CELLS if key in total]),
                hide_index=True, key="results_err_pooled", placeholder=NO_VALUE,
                column_config={"cell": "Cell", "samples": st.column_config.NumberColumn(
                    "Samples", format="%d")})
        else:
            st.caption(f"No pooled counts for {strategy}.")
        st.caption("Fixed: the teacher is wrong and the student right. Newly wrong: the teacher "
                   "is right and the student wrong. Both wrong and fixed add up to the teacher's "
                   "mistakes; both wrong and newly wrong to the student's.")
    cells = [key for key, *_ in figures.ERROR_CELLS]
    data = state.clicked(chart_key, "results_last_click")
    if data and 0 <= data[0] < len(cells):
        st.session_state["results_err_cell"] = cells[data[0]]
    if st.session_state.get("results_err_cell") not in cells:
        st.session_state["results_err_cell"] = "newly_wrong"
    labels_of = {key: label for key, label, *_ in figures.ERROR_CELLS}
    cell = right.selectbox("Samples listed", cells, key="results_err_cell",
                           format_func=labels_of.get,
                           help="Click a cell of the map to list its samples.")
    if cell == "both_right":
        mask = ~(masks["both_wrong"] | masks["fixed"] | masks["newly_wrong"])
    else:
        mask = np.asarray(masks[cell], dtype=bool)
    rows = np.flatnonzero(mask)
    if not len(rows):
        st.info(f"No test sample is {labels_of[cell]} for {strategy}, seed {seed}.",
                icon=":material/info:")
        return
    names_of = preds["class_names"]
    path = run.config.get("bundle") or run.bundle or ""
    ids, images = test_inputs(str(path), json.dumps(run.config.get("data_options") or {},
                                                    sort_keys=True))
    if ids is not None and len(ids) != len(labels):
        ids = None
    if images is not None and len(images) != len(labels):
        images = None
    student_conf = probabilities(preds["logits"][rows]).max(1)
    shown = rows[:MAX_ROWS]
    frame = pd.DataFrame({
        "row": shown,
        **({"sample_id": [str(ids[i]) for i in shown]} if ids is not None else {}),
        "true": [names_of[labels[i]] for i in shown],
        "teacher": [names_of[teacher[i]] for i in shown],
        "student": [names_of[student[i]] for i in shown],
        "confidence": 100 * student_conf[:MAX_ROWS],
    })
    st.caption(f"{len(rows):,} test samples are {labels_of[cell]} for {strategy}, seed {seed}"
               + (f"; the first {MAX_ROWS:,} listed" if len(rows) > MAX_ROWS else "") + ".")
    st.dataframe(frame, hide_index=True, key="results_err_samples", placeholder=NO_VALUE,
                 column_config={
                     "row": st.column_config.NumberColumn(
                         "Row", format="%d", help="Position in the test split."),
                     "sample_id": "Sample id", "true": "True label",
                     "teacher": "Teacher said", "student": "Student said",
                     "confidence": st.column_config.NumberColumn(
                         "Student's confidence", format="%.1f%%")})
    if images is not None:
        first = shown[:MAX_IMAGES]
        st.plotly_chart(figures.image_grid(
            images[first], [f"#{i}: true {names_of[labels[i]]}, teacher "
                            f"{names_of[teacher[i]]}, student {names_of[student[i]]}"
                            for i in first], cols=4, cell_px=150),
            key="results_err_images", config={"staticPlot": True})
        st.caption(f"The first {len(first)} of these samples as images.")


def render_calibration(group: list[Run], summary: dict, best_name: str) -> None:
    """ECE / NLL / Brier per model, and one reliability diagram of the teacher and students."""
    st.subheader("Can the students' confidence be trusted?")
    calibration = summary.get("calibration")
    if calibration:
        rows = [{"model": "teacher", **(calibration.get("teacher") or {})}]
        rows += [{"model": name, **(calibration.get("strategies", {}).get(name) or {})}
                 for name in strategy_order(list(calibration.get("strategies", {})))]
        frame = pd.DataFrame(rows, columns=["model", "ece", "nll", "brier"])
        frame["ece"] = 100 * frame["ece"].astype(float)
        st.dataframe(frame, hide_index=True, key="results_calibration_table",
                     placeholder=NO_VALUE, column_config={
                         "model": "Model",
                         "ece": st.column_config.NumberColumn(
                             "ECE", format="%.1f%%",
                             help="Expected calibration error: 15 equal-width bins of the "
                                  "top-class confidence, the gap between confidence and "
                                  "accuracy weighted by the bin's share. Lower is better."),
                         "nll": st.column_config.NumberColumn(
                             "NLL", format="%.3f",
                             help="Mean negative log-probability of the true class."),
                         "brier": st.column_config.NumberColumn(
                             "Brier", format="%.3f",
                             help="Per sample, the sum over classes of the squared error "
                                  "against the one-hot label; then the mean (0 to 2).")})
        st.caption("Students: mean over seeds. Lower is better for all three.")
    else:
        st.caption("No calibration numbers for these runs.")
    diagrams = summary.get("reliability") or {}
    pooled = diagrams.get("strategies") or {}
    options = [n for n in strategy_order(list(summary["strategies"])) if n in pooled]
    if not diagrams.get("teacher") or not options:
        st.info("No reliability diagram: the runs' saved test predictions cannot be read.",
                icon=":material/info:")
        return
    chosen = st.multiselect("Students on the diagram", options,
                            default=[n for n in shown_students(group) if n in options],
                            key="results_calibration_strategies",
                            format_func=state.strategy_label)
    curves = {"teacher": diagrams["teacher"], **{n: pooled[n] for n in chosen}}
    st.plotly_chart(figures.calibration_reliability(curves, highlight=best_name),
                    key="results_reliability_chart")
    st.caption("Each student's test predictions pooled over its seeds, 15 equal-width bins of "
               "the confidence in the predicted class.")


def render_per_class(group: list[Run], summary: dict, best_name: str) -> None:
    st.subheader("Per class: before (teacher) and after (students)")
    options = strategy_order(list(summary["strategies"]))
    chosen = st.multiselect("Students to show", options, default=shown_students(group),
                            key="results_class_strategies", format_func=state.strategy_label)
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
               "with the same wrong class. **ce** never sees the teacher: its share is the "
               "floor, how often a student makes those mistakes on its own because the samples "
               "are hard. A strategy's excess over that floor is what the teacher passed on.")


def render_curves(group: list[Run], summary: dict, best_name: str) -> None:
    st.subheader("Learning curves")
    left, right = st.columns([3, 1])
    options = strategy_order(list(summary["strategies"]))
    chosen = left.multiselect("Strategies", options, default=options,
                              key="results_curve_strategies", format_func=state.strategy_label)
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
                "Mistakes copied", format="%.1f%%",
                help="Share of the teacher's test mistakes the student repeats."),
            "duration_s": st.column_config.NumberColumn("Took", format="%.1f s"),
            "error": "Error", "id": "Run id",
        })
    st.caption(f"{len(frame)} of {len(runs)} runs shown. `kdcore runs` lists them in a terminal.")


def reset_strategy_choices() -> None:
    """Another comparison has other strategies: start its pickers from their defaults."""
    for key in ("results_class_strategies", "results_curve_strategies",
                "results_calibration_strategies", "results_sig_strategy",
                "results_err_strategy", "results_err_cell"):
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
        summary = summarise(group, state.store())
    except (KDCoreError, KeyError, OSError) as exc:
        state.show_error(exc, prefix="Cannot summarise these runs: ")
        st.stop()
    best_name = selection.best_student(group) or strategy_order(list(summary["strategies"]))[0]
    render_decision(summary, best_name)
    render_headline(summary, best_name)
    render_comparison(summary, best_name)
    render_significance(summary, best_name)
    render_error_map(group, summary, best_name)
    render_calibration(group, summary, best_name)
    render_inheritance(summary)
    render_per_class(group, summary, best_name)
    render_curves(group, summary, best_name)
render_run_table(all_runs)
