"""Teacher bias: where and why the teacher is wrong, class by class and sample by sample."""

from __future__ import annotations

import numpy as np
import streamlit as st

from kdcore.analysis.analyzer import SPLIT_MEANING, assess_table, report, select
from kdcore.analysis.bias import rectified, reliability, softened
from kdcore.analysis.label_quality import LABEL_ERROR, TEACHER_BIAS, split_rates
from kdcore.data.sources import bundle_features, source_key
from kdcore.errors import KDCoreError
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


@st.cache_data(show_spinner="Analysing the teacher's predictions…", max_entries=16)
def analyse(token: str, split: str | None, _table) -> dict:
    """The bias report of one source and split (cached by the source's token and the split)."""
    chosen = select(_table, split)
    rows = np.flatnonzero(chosen.labels >= 0)
    rep = report(chosen)
    return {"report": rep, "rows": rows,
            "reliability": reliability(rep.confidence, ~rep.wrong, n_bins=10)}


@st.cache_resource(show_spinner="Checking which mistakes look like label errors…",
                   max_entries=16)
def label_check(token: str, split: str | None, _table, _bundle):
    """Label errors vs teacher bias (cleanlab), before the user's overrides; aligned with the
    rows of ``analyse``'s report. Cached as a resource: overrides are applied to a copy."""
    features = None
    if _bundle is not None:
        features = bundle_features(_bundle)
        if split is not None:
            features = features[_table.split == split]
    return assess_table(select(_table, split), features=features)


@st.cache_data(show_spinner=False, max_entries=16)
def overrides_key(token: str, _table) -> str:
    """The key of the source's label overrides: its content hash, once per source."""
    return source_key(_table)


VERDICT_TEXT = {TEACHER_BIAS: "teacher bias", LABEL_ERROR: "label error"}
KINDS = {"all": "All mistakes", TEACHER_BIAS: "Teacher bias", LABEL_ERROR: "Label errors"}


def save_verdict(verdict_source: str, key: str, widget: str) -> None:
    """on_change of a sample's verdict selectbox: store (or clear) the override."""
    choice = st.session_state.get(widget)
    set_override(state.workspace(), verdict_source, key,
                 None if choice == "detected" else choice)


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

labelled_splits = [s for s in table.splits if s != "unlabelled"
                   and (table.labels[table.split == s] >= 0).any()]
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
if "unlabelled" in table.splits:
    n_unlabelled = int((table.split == "unlabelled").sum())
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
try:
    lq = label_check(token, split, table, bundle).take(np.arange(rep.n_samples))  # a copy
    verdict_source = overrides_key(token, table)
    lq.apply_overrides(load_overrides(state.workspace(), verdict_source))
except (KDCoreError, ValueError) as exc:  # the analysis above still stands
    state.show_error(exc, "Label errors vs teacher bias: ")
    lq = None
checked = lq is not None and lq.available
per_class = split_rates(rep.per_class, lq) if checked else rep.per_class
verdicts = lq.verdict if checked else np.full(rep.n_samples, "", dtype=object)

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
        "teacher bias." + (f" {int(lq.overridden.sum())} verdicts are yours (overrides)."
                           if lq.overridden.any() else ""),
        help=f"{lq.method}. {lq.note} Training with +lq leaves likely label errors out of "
             "rectification. Override a verdict in the sample view below.")
elif lq is not None:
    st.info(f"Label errors vs teacher bias: not assessed here: {lq.reason}.",
            icon=":material/info:")

# ---------------------------------------------------------------- per class and confusion
c1, c2 = st.columns(2)
with c1:
    st.plotly_chart(figures.bias_rate_bars(per_class), key=f"bias_bars_{split_choice}",
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
        key=f"bias_heatmap_{split_choice}", on_select="rerun", selection_mode=("points",),
        width="stretch")
    st.caption("Rows: true class; columns: what the teacher said. Click a cell to see those "
               "samples below.")

# a click sets the manual filter below (which also works without clicking)
for key, fields in ((f"bias_bars_{split_choice}", 1), (f"bias_heatmap_{split_choice}", 2)):
    data = state.clicked(key, "bias_last_click")
    if data:
        st.session_state["bias_true"] = data[0]
        st.session_state["bias_pred"] = data[1] if fields == 2 else ANY
        st.session_state["bias_only_wrong"] = True

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
only_wrong = f3.toggle("Mistakes only", value=True, key="bias_only_wrong")
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
    chosen = select(table, split)
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
            title = (f"#{ids[i]}: true {names[rep.labels[s]]}, teacher said "
                     f"{names[rep.predicted[s]]} ({rep.confidence[s]:.0%} sure)")
            if pictures is not None:
                cols[2 * j].image(pictures[i] or state.missing_thumbnail(),
                                  caption=None if pictures[i] else "missing", width="stretch")
                target = cols[2 * j + 1]
            else:
                target = cols[j]
            target.plotly_chart(
                figures.probability_bars(names, teacher_p[i], rect_p[i],
                                        true_class=int(rep.labels[s]), title=title),
                key=f"bias_probs_{i}", width="stretch")
            if checked and rep.wrong[s]:
                sample_key = str(lq.keys[s])
                detected = VERDICT_TEXT[LABEL_ERROR if lq.flagged is not None and (
                    lq.flagged[s] and lq.model_pred[s] == rep.predicted[s]) else TEACHER_BIAS]
                widget = f"bias_verdict_{table.source}_{sample_key}"
                current = verdicts[s] if lq.overridden[s] else "detected"
                if st.session_state.get(widget) not in ("detected", *VERDICT_TEXT):
                    st.session_state[widget] = current
                target.selectbox(
                    f"Verdict (label quality {lq.label_quality[s]:.2f})",
                    ["detected", TEACHER_BIAS, LABEL_ERROR], key=widget,
                    format_func=lambda v, d=detected: (f"detected: {d}" if v == "detected"
                                                       else f"override: {VERDICT_TEXT[v]}"),
                    on_change=save_verdict, args=(verdict_source, sample_key, widget),
                    help="Label quality (cleanlab): near 0 the label looks wrong, near 1 "
                         "it looks right. Your choice is stored in the workspace and used by "
                         "the analysis and by training with +lq.")

# ---------------------------------------------------------------- pairs and confidence
st.subheader("Most confused pairs")
if n_wrong:
    pairs = rep.top_confusions.head(10)[["true", "predicted", "count", "share"]]
    p1, p2 = st.columns([2, 3])
    p1.dataframe(pairs, hide_index=True, width="stretch", column_config={
        "true": "true class", "predicted": "teacher said", "count": "samples",
        "share": st.column_config.ProgressColumn("share of all mistakes", format="percent",
                                                 min_value=0.0, max_value=1.0)})
    p2.plotly_chart(figures.top_confusions_bar(pairs), key="bias_pairs", width="stretch")
else:
    st.success("The teacher makes no mistakes on these rows: there is no bias to remove here.")

st.subheader("Confidence when right vs when wrong")
h1, h2 = st.columns(2)
h1.plotly_chart(figures.confidence_histogram(rep.confidence, rep.wrong), key="bias_conf",
                width="stretch")
h2.plotly_chart(figures.reliability_diagram(result["reliability"]), key="bias_reliability",
                width="stretch")
st.caption("A teacher that is confidently wrong passes its mistakes on as strong soft targets; "
           "this is the bias that elimination and rectification are meant to stop.")

with st.expander("Per-class table"):
    st.dataframe(per_class, hide_index=True, width="stretch", column_config={
        "teacher_accuracy": st.column_config.NumberColumn("teacher accuracy", format="percent"),
        "bias_rate": st.column_config.NumberColumn("bias rate", format="percent"),
        "teacher_bias_rate": st.column_config.NumberColumn("of which teacher bias",
                                                           format="percent"),
        "label_error_rate": st.column_config.NumberColumn("of which label errors",
                                                          format="percent"),
        "mean_confidence_wrong": st.column_config.NumberColumn("confidence when wrong",
                                                               format="percent"),
        "share_of_errors": st.column_config.NumberColumn("share of mistakes", format="percent"),
    })
