"""Teacher bias: where and why the teacher is wrong, class by class and sample by sample."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from kdcore.analysis.analyzer import SPLIT_MEANING, report, select
from kdcore.analysis.bias import rectified, reliability, softened
from kdcore.analysis.label_quality import LABEL_ERROR, TEACHER_BIAS, split_rates
from kdcore.data.tables import SPLITS
from kdcore.errors import KDCoreError
from kdcore.store.label_checks import (
    LabelCheck,
    assessment,
    override_positions,
    read_verdicts,
    sample_key,
)
from kdcore.store.overrides import load_overrides, set_override
from kdcore.value import figures
from kdcore_app import state

ALL = "all"
SPLIT_LABELS = {"train": "Distillation data (train)", "test": "Held-out data (test)",
                ALL: "All labelled rows"}
ANY = -1
MAX_SAMPLES = 24
MAX_THUMBNAILS = 48
GRID_COLUMNS = 8


POLL_S = 2  # how often the page asks whether the label check has finished
# Plotly's toolbar sits in the top right corner, over the chart titles (and beside
# Streamlit's own full-screen button): these charts go without it. Zoom: full screen.
NO_TOOLBAR = {"displayModeBar": False}


@st.cache_resource(show_spinner=False, max_entries=4)
def chosen_table(token: str, split: str | None, _table):
    """``select(table, split)`` once per source and split (a resource: a large table is
    neither copied nor pickled on every rerun)."""
    counts = split_counts(token, _table)
    if split is not None and counts.get(split, (0, 0))[0] == len(_table.labels):
        return _table  # every row is in this split: no copy
    return select(_table, split)


@st.cache_data(show_spinner=False, max_entries=16)
def split_counts(token: str, _table) -> dict[str, tuple[int, int]]:
    """Rows and labelled rows per split, once per source (a large table's splits take a
    while to count, and every rerun needs them)."""
    if _table.split is None:
        return {}
    codes, names = pd.factorize(_table.split)  # one pass over the rows
    rows = np.bincount(codes, minlength=len(names))
    labelled = np.bincount(codes, weights=_table.labels >= 0, minlength=len(names))
    found = {str(n): (int(r), int(k)) for n, r, k in zip(names, rows, labelled, strict=True)}
    return {s: found[s] for s in SPLITS if s in found}  # in the order of table.splits


@st.cache_resource(show_spinner=False, max_entries=16)
def reliability_bins(token: str, split: str | None, _report):
    """The reliability diagram's bins (only that chart needs them: not before the charts)."""
    return reliability(_report.confidence, ~_report.wrong, n_bins=10)


@st.cache_resource(show_spinner="Analysing the teacher's predictions…", max_entries=16)
def analyse(token: str, split: str | None, _table) -> dict:
    """The bias report of one source and split (cached by the source's token and the split;
    a resource, so its per-row arrays are not pickled on every rerun: the page only reads it)."""
    chosen = chosen_table(token, split, _table)
    rows = np.flatnonzero(chosen.labels >= 0)
    return {"report": report(chosen), "rows": rows}


@st.cache_resource(show_spinner=False, max_entries=16)
def label_check_run(workspace: str, token: str, _table, _path: str | None) -> LabelCheck:
    """The source's label check in a task process (never in the server), started once per
    source and workspace: it returns at once, and the page polls it."""
    return LabelCheck(_table, path=_path, workspace=workspace)


@st.cache_resource(show_spinner=False, max_entries=8)
def stored_verdicts(path: str, mtime: float):
    """A finished check's per-row verdicts, read once per file."""
    return read_verdicts(path)


def source_path(source: str) -> str | None:
    """The file or folder a task can read the source from; None for an upload (in memory)."""
    value = state.sources()[source]
    if value.startswith(state.UPLOAD_PREFIX):
        return None
    return value.removeprefix(state.TABLE_PREFIX)


def follow_check(check: LabelCheck) -> None:
    """The label check's progress; once it is done, the whole page reruns with its verdicts."""
    status = check.status()
    if status.state == "done":
        st.info("Label errors checked: showing them…", icon=":material/check:")
        st.rerun()  # the whole page: its charts split by the verdicts
    if status.state == "running":
        st.info(f"Checking for label errors… ({status.seconds:.0f} s so far) The charts below "
                "split into teacher bias and likely label errors when the check is done.",
                icon=":material/hourglass_top:")
    else:
        st.warning(f"Label errors vs teacher bias could not be checked: {status.message}",
                   icon=":material/warning:")
        if st.button("Check again", key="bias_check_again"):
            label_check_run.clear()
            st.rerun()


PER_CLASS_HEADERS = {
    "class": "class", "support": "samples", "teacher_accuracy": "teacher accuracy",
    "bias_rate": "bias rate", "teacher_bias_rate": "of which teacher bias",
    "label_error_rate": "of which label errors", "most_confused_with": "most confused with",
    "mean_confidence_wrong": "confidence when wrong", "share_of_errors": "share of mistakes"}
PER_CLASS_PERCENT = ("teacher_accuracy", "bias_rate", "teacher_bias_rate", "label_error_rate",
                     "mean_confidence_wrong", "share_of_errors")


def per_class_view(per_class):
    """The per-class table as shown: readable headers, percentages as "92.3%", "—" where a
    value is missing (a Styler: the numbers underneath still sort as numbers)."""
    frame = per_class[[c for c in PER_CLASS_HEADERS if c in per_class]]
    frame = frame.drop(columns=[c for c in ("teacher_bias_rate", "label_error_rate")
                                if c in frame and frame[c].isna().all()])
    frame = frame.astype({c: float for c in PER_CLASS_PERCENT if c in frame})
    percent_columns = [PER_CLASS_HEADERS[c] for c in PER_CLASS_PERCENT if c in frame]
    frame = frame.rename(columns=PER_CLASS_HEADERS)
    return frame.style.format(percent, subset=percent_columns).format(
        lambda v: "—" if v is None or v != v else str(v), subset=["most confused with"]
        if "most confused with" in frame else [])


def plural(n: int, one: str, many: str | None = None) -> str:
    """``1 verdict``, ``2 verdicts``."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def percent(value) -> str:
    """The page's one percent format: one decimal ("92.3%"), "—" where there is no value."""
    return "—" if value is None or value != value else f"{100 * value:.1f}%"


VERDICT_TEXT = {TEACHER_BIAS: "teacher bias", LABEL_ERROR: "label error"}
KINDS = {"all": "All mistakes", TEACHER_BIAS: "Teacher bias", LABEL_ERROR: "Label errors"}


def save_verdict(verdict_source: str, key: str, widget: str) -> None:
    """on_change of a sample's verdict selectbox: store (or clear) the override. A callback
    displays nothing (Streamlit warns when one does, and its output would land at the top of
    the page): a failure is kept for the page to show."""
    choice = st.session_state.get(widget)
    try:
        set_override(state.workspace(), verdict_source, key,
                     None if choice == "detected" else choice)
    except KDCoreError as exc:
        st.session_state["bias_verdict_error"] = exc


@st.cache_data(show_spinner=False, max_entries=4)
def bundle_images(token: str, split: str | None, _bundle) -> np.ndarray | None:
    """The split's inputs as images (n, h, w), in the order of the prediction table."""
    shape = _bundle.image_shape
    if not shape:
        return None
    splits = [split] if split else _bundle.splits
    x = np.concatenate([_bundle.x(s) for s in splits])
    return x.reshape(len(x), *shape[-2:]) if np.prod(shape) == x[0].size else None


def sample_thumbnails(token: str, split: str | None, chosen, bundle, rows: np.ndarray
                      ) -> list[bytes | None] | None:
    """PNG thumbnails of rows ``rows`` of the ``chosen`` table (None where an image cannot be
    read), or None when the source has no images: a bundle of images, or a predicted image
    folder (``image_root``, its ``sample_id`` the path under it; CIFAR too)."""
    if bundle is not None:
        images = bundle_images(token, split, bundle)
        return None if images is None else [state.array_thumbnail(images[r]) for r in rows]
    if chosen.image_root and chosen.sample_id is not None:
        return [state.thumbnail(chosen.image_root, str(chosen.sample_id[r])) for r in rows]
    return None


def show_thumbnails(pictures: list[bytes | None], captions: list[str]) -> None:
    """A grid of thumbnails; a grey "missing" square where an image cannot be read."""
    for start in range(0, len(pictures), GRID_COLUMNS):
        cols = st.columns(GRID_COLUMNS)
        for col, picture, caption in zip(cols, pictures[start:start + GRID_COLUMNS],
                                         captions[start:start + GRID_COLUMNS], strict=False):
            col.image(picture or state.missing_thumbnail(),
                      caption=caption if picture else f"missing · {caption}", width="stretch")


st.title("Teacher bias")
st.caption("Where the teacher is wrong, how sure it was, and what a bias-aware student learns "
           "instead: for each mistake the teacher's top class and the true class swap places "
           "(rectification), keeping the rest of its knowledge.")

sources = state.sources()
left, right = st.columns([2, 3])
source = left.selectbox("Data source", list(sources), key="bias_source",
                        help="The bundled sample, other bundles, or a table you accepted on "
                             "the Data page.")
try:
    table = state.load_source(source)
    token = state.source_token(source)
except (KDCoreError, KeyError, OSError) as exc:
    state.show_error(exc, "Cannot load this source: ")
    st.info("Pick another source, or upload a prediction table on the Data page.")
    st.stop()

counts = split_counts(token, table)
labelled_splits = [s for s, (_, n) in counts.items() if s != "unlabelled" and n]
options = [*labelled_splits, ALL] if labelled_splits else [ALL]
default = options.index("test") if "test" in options else 0
split_choice = right.radio(
    "Which rows", options, index=default, horizontal=True, key="bias_split",
    format_func=SPLIT_LABELS.get,
    help="; ".join(f"{SPLIT_LABELS[s]}: {SPLIT_MEANING[s]}" for s in labelled_splits)
    or "This table has no split column: every labelled row is analysed.")
split = None if split_choice == ALL else split_choice
meaning = (SPLIT_MEANING[split] if split else
           "every labelled row together" + (" (distillation and held-out)"
                                            if labelled_splits else ""))
right.caption(f"{meaning[0].upper()}{meaning[1:]}.")
if "unlabelled" in counts:
    n_unlabelled = counts["unlabelled"][0]
    right.caption(f"Also {n_unlabelled:,} unlabelled rows ({SPLIT_MEANING['unlabelled']}); "
                  "without labels the teacher's mistakes there cannot be counted.")

try:
    result = analyse(token, split, table)
except KDCoreError as exc:
    state.show_error(exc)
    st.stop()
rep, rows = result["report"], result["rows"]
names = rep.class_names
n_wrong = int(rep.wrong.sum())
bundle = state.source_bundle(source)
check = label_check_run(str(state.workspace()), token, table, source_path(source))
lq, verdict_source = None, None
if check.status(start=False).state == "done":  # begun at the end of the page
    try:
        stored = stored_verdicts(str(check.output), check.output.stat().st_mtime)
        lq = assessment(stored, table, split, rows)
        verdict_source = check.key
        overrides = load_overrides(state.workspace(), verdict_source)
        lq.override_at(*override_positions(table, split, rows, overrides))
    except (KDCoreError, ValueError, OSError) as exc:  # the analysis above still stands
        state.show_error(exc, "Label errors vs teacher bias: ")
        lq = None
note = st.container()  # "checking for label errors…", filled in once the charts are drawn
checked = lq is not None and lq.available
per_class = split_rates(rep.per_class, lq) if checked else rep.per_class
verdicts = lq.verdict if checked else None  # read only where checked

m1, m2, m3, m4 = st.columns(4)
m1.metric("Teacher accuracy", f"{rep.accuracy:.1%}", help="Share of these rows it gets right.")
m2.metric("Bias rate", f"{rep.bias_rate:.1%}",
          help="Share of these rows it gets wrong: the teacher's bias that a student may copy.")
m3.metric("Mistakes", f"{n_wrong:,}", help="Rows where the teacher's top class is not the label.")
m4.metric("Rows analysed", f"{rep.n_samples:,}")
if checked:
    n_le = int(lq.likely_label_error.sum())
    st.markdown(
        f"**Trust the label or the teacher?** Of the {n_wrong:,} mistakes, **{n_le:,}** look "
        f"like label errors (the teacher is probably right) and **{n_wrong - n_le:,}** like "
        "teacher bias." + (f" {plural(int(lq.overridden.sum()), 'verdict')} "
                           f"{'is' if lq.overridden.sum() == 1 else 'are'} yours (overrides)."
                           if lq.overridden.any() else ""),
        help=f"{lq.method}. {lq.note} Training with +lq leaves likely label errors out of "
             "rectification. Override a verdict in the sample view below.")
elif lq is not None:
    st.info(f"Label errors vs teacher bias: not assessed here: {lq.reason}.",
            icon=":material/info:")

# ---------------------------------------------------------------- per class and confusion
# A click on a chart sets the manual filter below (which also works without clicking). Read
# here, before the charts are drawn: a click on one chart clears the other's selection (a new
# key), and so does a filter changed by hand, so no chart highlights an earlier choice.
generation = st.session_state.setdefault("bias_chart_generation", {"bars": 0, "heatmap": 0})


def chart_key(name: str) -> str:
    return f"bias_{name}_{split_choice}" + (f"_{generation[name]}" if generation[name] else "")


filters = (st.session_state.get("bias_true"), st.session_state.get("bias_pred"))
if st.session_state.get("bias_click_filter") not in (None, filters):  # changed by hand
    generation["bars"] += 1
    generation["heatmap"] += 1
    st.session_state["bias_click_filter"] = None
for name, other in (("bars", "heatmap"), ("heatmap", "bars")):
    data = state.clicked(chart_key(name), "bias_last_click")
    if data:
        st.session_state["bias_true"] = data[0]
        st.session_state["bias_pred"] = data[1] if name == "heatmap" and len(data) > 1 else ANY
        st.session_state["bias_only_wrong"] = True
        st.session_state["bias_click_filter"] = (st.session_state["bias_true"],
                                                 st.session_state["bias_pred"])
        generation[other] += 1

c1, c2 = st.columns(2)
with c1:
    st.plotly_chart(figures.bias_rate_bars(per_class), key=chart_key("bars"), config=NO_TOOLBAR,
                    on_select="rerun", selection_mode=("points",), width="stretch")
    st.caption("Red: share of the class the teacher gets wrong"
               + (" because of its own bias; amber: mistakes that look like label errors "
                  "(the teacher is probably right)" if checked else "")
               + ". Grey: how many samples the class has, so a rare class is not mistaken "
               "for a biased one. Click a bar to see that class's mistakes below.")
with c2:
    heatmap = st.container()
    kind = st.segmented_control(
        "Mistakes shown", list(KINDS), default="all", format_func=KINDS.get,
        key="bias_heatmap_kind", disabled=not checked,
        help="Split the confusion into the teacher's own bias and likely label errors."
        if checked else "Label errors could not be assessed for these rows.") or "all"
    norm = st.toggle("Row-normalised", key="bias_normalise",
                     help="Off: number of samples. On: each row shows how that class's "
                          "mistakes divide among the wrong classes.")
    confusion = rep.error_confusion
    if checked and kind != "all":
        le_conf = lq.label_error_confusion()
        confusion = le_conf if kind == LABEL_ERROR else confusion - le_conf
    heatmap.plotly_chart(
        figures.error_confusion_heatmap(confusion, names, normalise=norm),
        key=chart_key("heatmap"), config=NO_TOOLBAR, on_select="rerun",
        selection_mode=("points",), width="stretch")
    st.caption("Rows: true class; columns: what the teacher said. Click a cell to see those "
               "samples below.")

# ---------------------------------------------------------------- samples
st.subheader("The samples behind a mistake")
class_options = [ANY, *range(len(names))]
if st.session_state.get("bias_true") not in class_options:
    top_true = str(rep.top_confusions["true"].iloc[0]) if n_wrong else None
    st.session_state["bias_true"] = names.index(top_true) if top_true in names else ANY
f1, f2, f3, f4, f5 = st.columns(5)
true_c = f1.selectbox("True class", class_options, key="bias_true",
                      format_func=lambda i: "any" if i == ANY else names[i])
pred_c = f2.selectbox("Teacher said", class_options, key="bias_pred",
                      format_func=lambda i: "any" if i == ANY else names[i])
st.session_state.setdefault("bias_only_wrong", True)  # a default here, and a click sets it:
only_wrong = f3.toggle("Mistakes only", key="bias_only_wrong")  # so no value= (one or other)
default_t = 4.0
if bundle is not None:
    default_t = float(bundle.training_defaults.get("temperature", default_t))
temperature = f4.slider("Temperature", 1.0, 10.0, default_t, 0.5, key="bias_temperature",
                        help="Distributions are shown softened at this temperature, as the "
                             "student sees them in distillation; 1 shows the teacher's raw "
                             "confidence.")

max_shown = f5.slider("Samples shown", 2, MAX_SAMPLES, 8, 2, key="bias_n_show")

mask = np.ones(rep.n_samples, dtype=bool)
if true_c != ANY:
    mask &= rep.labels == true_c
if pred_c != ANY:
    mask &= rep.predicted == pred_c
if only_wrong:
    mask &= rep.wrong
if checked and kind != "all":  # the kind picked above the heatmap filters the samples too
    mask &= verdicts == kind
picked = np.flatnonzero(mask)
what = (f"true class {'any' if true_c == ANY else names[true_c]}, teacher said "
        f"{'any' if pred_c == ANY else names[pred_c]}" + (", mistakes only" if only_wrong else "")
        + (f", {KINDS[kind].lower()} only" if checked and kind != "all" else ""))
if not len(picked):
    st.info(f"No samples match ({what}). Click a bar or a cell above, or change the filters.")
else:
    n_show = min(len(picked), max_shown)
    st.caption(f"{len(picked):,} samples match ({what}); showing the first {n_show}, the "
               "teacher's most confident first. Gold band: the true class. Bars are softened at "
               "the temperature above; 'sure' is the teacher's raw confidence.")
    ranked = picked[np.argsort(-rep.confidence[picked], kind="stable")]
    order = ranked[:n_show]
    chosen = chosen_table(token, split, table)
    grid = ranked[:MAX_THUMBNAILS]
    pictures = sample_thumbnails(token, split, chosen, bundle, rows[grid])
    if pictures is not None:
        st.markdown(f"**The images** (showing {len(grid):,} of {len(picked):,}, the teacher's "
                    "most confident first)")
        show_thumbnails(pictures, [
            f"true {names[rep.labels[s]]} · said {names[rep.predicted[s]]} · "
            f"{rep.confidence[s]:.0%}" for s in grid])
    outputs = chosen.outputs[rows[order]]
    teacher_p = softened(outputs, probabilities=table.probabilities, temperature=temperature)
    rect_p = rectified(teacher_p, rep.labels[order])
    ids = chosen.sample_id[rows[order]] if chosen.sample_id is not None else rows[order]
    for start in range(0, n_show, 2):
        cols = st.columns([1, 3, 1, 3] if pictures is not None else [1, 1])
        for j, i in enumerate(range(start, min(start + 2, n_show))):
            s = order[i]
            # an image's id is its path: its file name is enough beside the picture
            title = (f"#{str(ids[i]).rsplit('/', 1)[-1]}: true {names[rep.labels[s]]}, said "
                     f"{names[rep.predicted[s]]}, {rep.confidence[s]:.1%} sure")
            if pictures is not None:
                cols[2 * j].image(pictures[i] or state.missing_thumbnail(),
                                  caption=None if pictures[i] else "missing", width="stretch")
                target = cols[2 * j + 1]
            else:
                target = cols[j]
            target.plotly_chart(
                figures.probability_bars(names, teacher_p[i], rect_p[i],
                                        true_class=int(rep.labels[s]), title=title),
                key=f"bias_probs_{i}", config=NO_TOOLBAR, width="stretch")
            if checked and rep.wrong[s]:
                key_of = (str(chosen.sample_id[rows[s]]) if chosen.sample_id is not None
                          else f"{split}:{rows[s]}" if split is not None  # row within split
                          else sample_key(table, int(rows[s])))
                detected = VERDICT_TEXT[LABEL_ERROR if lq.flagged is not None and (
                    lq.flagged[s] and lq.model_pred[s] == rep.predicted[s]) else TEACHER_BIAS]
                widget = f"bias_verdict_{table.source}_{key_of}"
                current = verdicts[s] if lq.overridden[s] else "detected"
                if st.session_state.get(widget) not in ("detected", *VERDICT_TEXT):
                    st.session_state[widget] = current
                target.selectbox(
                    f"Verdict (label quality {lq.label_quality[s]:.2f})",
                    ["detected", TEACHER_BIAS, LABEL_ERROR], key=widget,
                    format_func=lambda v, d=detected: (f"detected: {d}" if v == "detected"
                                                       else f"override: {VERDICT_TEXT[v]}"),
                    on_change=save_verdict, args=(verdict_source, key_of, widget),
                    help="Label quality (cleanlab): near 0 the label looks wrong, near 1 "
                         "it looks right. Your choice is stored in the workspace and used by "
                         "the analysis and by training with +lq.")

if (failure := st.session_state.pop("bias_verdict_error", None)) is not None:
    state.show_error(failure, "Your verdict was not stored: ")

# ---------------------------------------------------------------- pairs and confidence
st.subheader("Most confused pairs")
if n_wrong:
    pairs = rep.top_confusions.head(10)[["true", "predicted", "count", "share"]]
    p1, p2 = st.columns([2, 3])
    shown = pairs.assign(share=100 * pairs["share"])  # "%.1f%%" formats the value as given
    p1.dataframe(shown, hide_index=True, width="stretch", column_config={
        "true": "true class", "predicted": "teacher said", "count": "samples",
        "share": st.column_config.ProgressColumn("share of all mistakes", format="%.1f%%",
                                                 min_value=0.0, max_value=100.0)})
    p2.plotly_chart(figures.top_confusions_bar(pairs), key="bias_pairs",
                    config=NO_TOOLBAR, width="stretch")
else:
    st.success("The teacher makes no mistakes on these rows: there is no bias to remove here.")

st.subheader("Confidence when right vs when wrong")
h1, h2 = st.columns(2)
h1.plotly_chart(figures.confidence_histogram(rep.confidence, rep.wrong), key="bias_conf",
                config=NO_TOOLBAR, width="stretch")
h2.plotly_chart(figures.reliability_diagram(reliability_bins(token, split, rep)),
                key="bias_reliability", config=NO_TOOLBAR, width="stretch")
st.caption("A teacher that is confidently wrong passes its mistakes on as strong soft targets; "
           "this is the bias that elimination and rectification are meant to stop.")

with st.expander("Per-class table"):
    st.dataframe(per_class_view(per_class), hide_index=True, width="stretch")

# The label check last: the thread that hashes (and, for an upload, writes) the table and
# starts the task does not slow the charts down; the note above follows it.
if lq is None and check.status().state != "done":
    with note:
        st.fragment(follow_check, run_every=POLL_S)(check)
