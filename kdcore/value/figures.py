"""Every Plotly figure of kdcore: pure functions from DataFrames / arrays to figures.

The dashboard's pages and the exported report (kdcore.value.report) draw through these same
functions, so a chart, and the colour of each model in it, reads the same in the app and in the
report. No Streamlit here, so every chart can be tested and reused.
"""

from __future__ import annotations

import html
import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kdcore.analysis.bias import confusion_cells
from kdcore.learning.strategies import strategy_order
from kdcore.value.formatting import format_money

Figure = go.Figure  # for type hints elsewhere, without importing plotly there

# --- the one palette: "teacher", "student", "right", "wrong" look the same everywhere
TEACHER = "#7F8C8D"     # grey: the teacher, "before"
STUDENT = "#1F77B4"     # blue: the student a chart is about, "after"
RIGHT = "#2CA02C"       # green: correct predictions
WRONG = "#D62728"       # red: the teacher's bias (its mistakes)
RECTIFIED = "#2CA02C"   # green: the teacher's distribution after rectification
SUPPORT = "#BDC3C7"     # light grey: how many samples a class has
LABEL_ERROR = "#F2A33A"  # amber: a teacher "mistake" that is likely a label error
ERROR_SCALE = "Reds"
HEATMAP_CLASSES = 30  # a confusion heatmap of more classes draws the most confused ones
SERIES = px.colors.qualitative.Safe
# Each strategy keeps one colour on every chart (colour-blind safe Okabe-Ito and Tol colours,
# none of them the student blue or the teacher grey); a strategy not listed gets a fixed one
# of SERIES, chosen from its name.
STRATEGY_COLOURS = {"ce": "#CC79A7", "kd": "#E69F00", "kd+be": "#44AA99",
                    "kd+be+br": "#117733", "kd+be+br+dl": "#332288", "btkd": "#882255",
                    "dkd": "#999933"}

_FONT = dict(size=13)


def _plain(text: object) -> str:
    """User text (a class name, a sample id, a title) as Plotly shows it: literally.

    Plotly reads a subset of HTML in every title, tick label, legend entry and hover text
    (``<a href>``, ``<span style>``, ``<b>``, ``<br>``), so a class named ``<a href=...>`` would
    become a link. Escaped, ``&lt;`` shows as "<". Quotes stay as they are: Plotly decodes no
    ``&quot;``, and without a "<" they start no tag.
    """
    return html.escape(str(text), quote=False)


def count_axis(top: float) -> dict:
    """Axis (or colour bar) settings for counts of samples: whole numbers only, so a small
    count never reads "0.5 samples" nor ticks "0, 1, 1, 2" (one tick per unit up to 10)."""
    return dict(tickformat=",d", dtick=1) if top <= 10 else dict(tickformat=",d")


def _base_layout(title: str, height: int | None = None) -> dict:
    """The layout every chart starts from: title top left, legend in a row above the plot."""
    layout = dict(
        title=dict(text=_plain(title), x=0, xanchor="left"),
        font=dict(_FONT),
        margin=dict(l=10, r=10, t=60, b=10),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1),
        hoverlabel=dict(namelength=-1),
    )
    if height:
        layout["height"] = height
    return layout


def _finish(fig: go.Figure, title: str, *, height: int | None = None) -> go.Figure:
    fig.update_layout(_base_layout(title, height))
    return fig


def _spec_figure(data: list[dict], layout: dict) -> go.Figure:
    """A figure from plain trace and layout dicts, skipping Plotly's check of every property.

    That check (and ``update_layout``, ``make_subplots``, ``add_vrect``) costs tens of
    milliseconds a chart, many times the analysis behind the Teacher-bias page's charts. The
    dicts are written as Plotly's validator would leave them (titles as ``{"text": ...}``,
    colour scales as lists); tests/test_figures.py runs each through the validator.
    """
    return go.Figure({"data": data, "layout": layout}, _validate=False)


def _title(text: str) -> dict:
    return {"text": text}


# Plotly's "Reds" as its validator spells it out (plotly.js's own "Reds" is another scale)
_ERROR_COLOURS = getattr(px.colors.sequential, ERROR_SCALE)
_ERROR_SCALE = [[i / (len(_ERROR_COLOURS) - 1), c] for i, c in enumerate(_ERROR_COLOURS)]
# bias_rate_bars' two panels, as make_subplots(rows=2, row_heights=[0.7, 0.3],
# vertical_spacing=0.06) lays them out
_PANEL_GAP = 0.06
_LOWER_PANEL = 0.3 * (1 - _PANEL_GAP)


def bias_rate_bars(per_class: pd.DataFrame) -> go.Figure:
    """Teacher bias rate per class (top) with each class's number of samples (bottom).

    With ``label_error_rate`` and ``teacher_bias_rate`` columns (kdcore.analysis.label_quality) the
    top bars are stacked: teacher bias in red, likely label errors in amber.

    Reading both panels together tells imbalance from bias: a tall red bar over a short grey
    bar is a rare class the teacher fails on; a tall red bar over a normal grey bar is bias.
    Every point carries ``customdata = [class index]`` so a click can filter a sample view.
    """
    df = per_class.reset_index(drop=True)
    classes = [_plain(c) for c in df["class"]]
    support = df["support"].to_numpy()
    rate = df["bias_rate"].to_numpy(dtype=float)
    wrong = np.rint(np.nan_to_num(rate) * support).astype(int)
    idx = [[i] for i in range(len(df))]  # plain lists: the browser returns them as clicked
    confused = df.get("most_confused_with", pd.Series([None] * len(df))).fillna("—").map(_plain)
    rate0 = np.nan_to_num(rate)
    hover = [
        f"class {c}: wrong on {w} of {s} samples ({r:.1%})<br>most often read as {m}"
        if s else f"class {c}: no samples"
        for c, w, s, r, m in zip(classes, wrong, support, rate0, confused, strict=True)
    ]
    rate_text = [f"{r:.1%}" if s else "" for r, s in zip(rate0, support, strict=True)]
    top_panel = dict(type="bar", x=classes, customdata=idx, hoverinfo="text", xaxis="x",
                     yaxis="y")
    layout = _base_layout("Where the teacher is wrong: share of each class it misclassifies",
                          height=430)
    split = ("label_error_rate" in df and df["label_error_rate"].notna().any())
    if split:  # stacked: teacher bias (red) under likely label errors (amber)
        le = df["label_error_rate"].to_numpy(dtype=float)
        tb = df["teacher_bias_rate"].to_numpy(dtype=float)
        n_le = np.rint(np.nan_to_num(le) * support).astype(int)
        hover = [f"{h}<br>teacher bias: {w - e}, likely label errors: {e}"
                 for h, w, e in zip(hover, wrong, n_le, strict=True)]
        data = [dict(top_panel, y=tb, name="teacher bias", marker=dict(color=WRONG),
                     hovertext=hover),
                dict(top_panel, y=le, name="likely label errors",
                     marker=dict(color=LABEL_ERROR), text=rate_text, textposition="outside",
                     hovertext=hover)]
        layout["barmode"] = "stack"
    else:
        data = [dict(top_panel, y=rate, name="bias rate (share wrong)", marker=dict(color=WRONG),
                     text=rate_text, textposition="outside", hovertext=hover)]
    data.append(dict(
        type="bar", x=classes, y=support, name="samples in class", marker=dict(color=SUPPORT),
        text=[str(s) for s in support], textposition="outside", customdata=idx,
        hovertext=hover, hoverinfo="text", xaxis="x2", yaxis="y2"))
    top = float(np.nanmax(rate)) if np.isfinite(rate).any() else 0.0
    most = support.max(initial=0)
    layout.update(
        xaxis=dict(anchor="y", domain=[0.0, 1.0], matches="x2", showticklabels=False),
        xaxis2=dict(anchor="y2", domain=[0.0, 1.0], title=_title("true class"),
                    type="category"),
        yaxis=dict(anchor="x", domain=[_LOWER_PANEL + _PANEL_GAP, 1.0], tickformat=".0%",
                   title=_title("teacher wrong"), range=[0, max(top * 1.25, 0.05)]),
        yaxis2=dict(anchor="x2", domain=[0.0, _LOWER_PANEL], title=_title("samples"),
                    range=[0, max(most * 1.35, 1)], **count_axis(most)),
        bargap=0.25, clickmode="event+select")
    return _spec_figure(data, layout)


def error_confusion_heatmap(error_confusion, class_names: Sequence[str],
                            normalise: bool = False) -> go.Figure:
    """The teacher's mistakes: true class (rows) x the class it predicted (columns).

    With ``normalise`` each row shows the share of that class's mistakes going to each wrong
    class. The diagonal (correct predictions) is left blank. An invisible marker sits on every
    non-empty cell with ``customdata = [true index, predicted index]`` so a click selects it.
    ``error_confusion`` is dense or scipy sparse (many classes); of more than HEATMAP_CLASSES
    classes only the HEATMAP_CLASSES with the most mistakes (as true or predicted class) are
    drawn, so the figure stays small whatever the class count.
    """
    true, predicted, count = confusion_cells(error_confusion)
    shown = _most_confused(true, predicted, count, len(class_names))
    k = len(shown)
    names = [_plain(class_names[i]) for i in shown]
    position = np.full(len(class_names), -1)
    position[shown] = np.arange(k)
    inside = (position[true] >= 0) & (position[predicted] >= 0)
    counts = np.zeros((k, k))
    counts[position[true[inside]], position[predicted[inside]]] = count[inside]
    # a row's share is of all the class's mistakes, drawn or not
    rows = np.bincount(true, weights=count, minlength=len(class_names))[shown][:, None]
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    z = (shares if normalise else counts).copy()
    np.fill_diagonal(z, np.nan)
    text = [[("" if i == j or not counts[i, j] else
              f"{shares[i, j]:.0%}" if normalise else str(int(counts[i, j])))
             for j in range(k)] for i in range(k)]
    hover = [[("correct predictions (not shown)" if i == j else
               f"true {names[i]}, teacher said {names[j]}: {int(counts[i, j])} "
               f"samples ({shares[i, j]:.0%} of class {names[i]}'s mistakes)")
              for j in range(k)] for i in range(k)]
    colorbar = dict(title=_title("share" if normalise else "samples"),
                    **(dict(tickformat=".0%") if normalise
                       else count_axis(np.nanmax(z, initial=0))))
    ti, pj = np.nonzero(counts > 0)
    data = [
        dict(type="heatmap", z=z, x=names, y=names, text=text, texttemplate="%{text}",
             hovertext=hover, hoverinfo="text", colorscale=_ERROR_SCALE, zmin=0, xgap=1,
             ygap=1, colorbar=colorbar),
        dict(type="scatter", x=[names[j] for j in pj], y=[names[i] for i in ti],
             mode="markers", marker=dict(symbol="square", size=28, color="rgba(0,0,0,0)"),
             selected=dict(marker=dict(color="rgba(0,0,0,0)")),
             unselected=dict(marker=dict(opacity=1)),
             customdata=[[int(shown[i]), int(shown[j])] for i, j in zip(ti, pj, strict=True)],
             hovertext=[hover[i][j] for i, j in zip(ti, pj, strict=True)], hoverinfo="text",
             showlegend=False, name="mistakes"),
    ]
    what = "share of each class's mistakes" if normalise else "number of samples"
    if k < len(class_names):
        what += f"; the {k} of {len(class_names):,} classes with the most mistakes"
    layout = _base_layout(f"Which classes the teacher confuses ({what})", height=460)
    layout.update(xaxis=dict(title=_title("teacher's prediction"), type="category",
                             side="bottom"),
                  yaxis=dict(title=_title("true class"), type="category",
                             autorange="reversed"),
                  plot_bgcolor="white", clickmode="event+select")
    return _spec_figure(data, layout)


def _most_confused(true: np.ndarray, predicted: np.ndarray, count: np.ndarray,
                   n_classes: int) -> np.ndarray:
    """Indices (ascending) of the classes a confusion heatmap draws: all of up to
    HEATMAP_CLASSES, else the HEATMAP_CLASSES with the most mistakes as true or predicted."""
    if n_classes <= HEATMAP_CLASSES:
        return np.arange(n_classes)
    wrong = true != predicted
    mistakes = (np.bincount(true[wrong], weights=count[wrong], minlength=n_classes)
                + np.bincount(predicted[wrong], weights=count[wrong], minlength=n_classes))
    return np.sort(np.argsort(-mistakes, kind="stable")[:HEATMAP_CLASSES])


def top_confusions_bar(top_confusions: pd.DataFrame, limit: int = 10) -> go.Figure:
    """The most frequent (true -> predicted) mistakes, largest first."""
    df = top_confusions.head(limit).iloc[::-1]
    labels = [f"{_plain(t)} read as {_plain(p)}"
              for t, p in zip(df["true"], df["predicted"], strict=True)]
    counts, shares = df["count"].tolist(), df["share"].tolist()
    data = [dict(
        type="bar", x=counts, y=labels, orientation="h", marker=dict(color=WRONG),
        text=[f"{c} ({s:.1%} of all mistakes)" for c, s in zip(counts, shares, strict=True)],
        textposition="auto", hoverinfo="text",
        hovertext=[f"{lab}: {c} samples" for lab, c in zip(labels, counts, strict=True)],
    )]
    layout = _base_layout("The teacher's most frequent mistakes",
                          height=max(220, 60 + 32 * len(df)))
    layout.update(xaxis=dict(title=_title("samples"), **count_axis(max(counts, default=0))),
                  yaxis=dict(title=_title("")))
    return _spec_figure(data, layout)


def confidence_histogram(confidence: np.ndarray, wrong: np.ndarray, bins: int = 20) -> go.Figure:
    """How sure the teacher was, for its right and its wrong predictions (overlaid)."""
    confidence = np.asarray(confidence, dtype=float)
    wrong = np.asarray(wrong, dtype=bool)
    edges = np.linspace(0, 1, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    data = []
    for name, mask, colour in (("right", ~wrong, RIGHT), ("wrong", wrong, WRONG)):
        counts, _ = np.histogram(np.clip(confidence[mask], 0, 1), bins=edges)
        share = counts / max(mask.sum(), 1)
        data.append(dict(
            type="bar", x=centres, y=share, name=f"{name} ({int(mask.sum())})",
            marker=dict(color=colour), customdata=counts, hovertemplate=(
                f"{name}: %{{customdata}} samples with confidence "
                "%{x:.0%}±" + f"{50 / bins:.1f}%<extra></extra>")))
    layout = _base_layout("Is the teacher less sure when it is wrong?", height=380)
    layout.update(barmode="group", bargap=0.1,
                  xaxis=dict(title=_title("teacher's confidence in its prediction"),
                             tickformat=".0%", range=[0, 1]),
                  yaxis=dict(title=_title("share of predictions"), tickformat=".0%"))
    return _spec_figure(data, layout)


def reliability_diagram(reliability_df: pd.DataFrame) -> go.Figure:
    """Accuracy against confidence per bin; the diagonal is a perfectly calibrated teacher."""
    df = reliability_df[reliability_df["count"] > 0]
    data = [
        dict(type="scatter", x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated",
             line=dict(color=TEACHER, dash="dash"), hoverinfo="skip"),
        dict(type="scatter", x=df["mean_confidence"].to_numpy(),
             y=df["accuracy"].to_numpy(), mode="lines+markers", name="teacher",
             line=dict(color=STUDENT),
             marker=dict(size=np.clip(np.sqrt(df["count"].to_numpy()), 6, 16)),
             customdata=np.stack([df["count"], df["bin_lower"], df["bin_upper"]], 1),
             hovertemplate=("confidence %{customdata[1]:.0%}–%{customdata[2]:.0%}: "
                            "%{customdata[0]} samples, said %{x:.0%} sure, right %{y:.0%}"
                            "<extra></extra>")),
    ]
    layout = _base_layout("Can the teacher's confidence be trusted?", height=380)
    layout["title"]["subtitle"] = _title("points below the dashed line: more sure than right")
    layout["margin"]["t"] = 80
    layout.update(legend=dict(orientation="v", yanchor="top", y=0.98, xanchor="left", x=0.02),
                  xaxis=dict(title=_title("teacher's confidence"), tickformat=".0%",
                             range=[0, 1.02]),
                  yaxis=dict(title=_title("how often it was right"), tickformat=".0%",
                             range=[0, 1.02]))
    return _spec_figure(data, layout)


def probability_bars(class_names: Sequence[str], teacher_probs: np.ndarray,
                     rectified_probs: np.ndarray, *, true_class: int | None = None,
                     title: str | None = None, height: int = 260) -> go.Figure:
    """The teacher's distribution and the distribution after rectification, side by side."""
    names = [_plain(c) for c in class_names]
    data = [
        dict(type="bar", x=names, y=np.asarray(teacher_probs, float), name="teacher",
             marker=dict(color=WRONG),
             hovertemplate="class %{x}: %{y:.1%}<extra>teacher</extra>"),
        dict(type="bar", x=names, y=np.asarray(rectified_probs, float),
             name="after rectification", marker=dict(color=RECTIFIED),
             hovertemplate="class %{x}: %{y:.1%}<extra>rectified</extra>"),
    ]
    layout = _base_layout(title or "Teacher's probabilities vs after rectification",
                          height=height)
    layout["margin"]["t"] = 50
    layout.update(barmode="group", bargap=0.2,
                  xaxis=dict(title=_title("class"), type="category"),
                  yaxis=dict(title=_title("probability"), tickformat=".0%", range=[0, 1.05]))
    if true_class is not None:  # a gold band over the true class, as add_vrect draws it
        layout["shapes"] = [dict(type="rect", x0=true_class - 0.5, x1=true_class + 0.5,
                                 xref="x", y0=0, y1=1, yref="y domain", fillcolor="gold",
                                 opacity=0.18, line=dict(width=0))]
        layout["annotations"] = [dict(text="true", showarrow=False, x=true_class - 0.5,
                                      xanchor="left", xref="x", y=1, yanchor="top",
                                      yref="y domain")]
    return _spec_figure(data, layout)


def image_grid(images: np.ndarray, titles: Sequence[str] | None = None, *,
               cols: int = 6, cell_px: int = 120) -> go.Figure:
    """Small greyscale images (n, h, w) in a grid, one title each (ink is dark)."""
    images = np.asarray(images, dtype=float)
    if images.ndim == 2:
        images = images[None]
    n = len(images)
    cols = max(1, min(cols, n))
    fig = px.imshow(images, facet_col=0, facet_col_wrap=cols, color_continuous_scale="gray_r",
                    facet_col_spacing=0.02, facet_row_spacing=0.12 if n > cols else 0.0)
    titles = list(titles) if titles is not None else [str(i) for i in range(n)]
    for annotation in fig.layout.annotations:  # facet titles read "facet_col=i"
        i = int(annotation.text.split("=")[-1])
        annotation.text = _plain(titles[i]) if i < len(titles) else ""
        annotation.font.size = 12
    fig.update_xaxes(showticklabels=False, showgrid=False)
    fig.update_yaxes(showticklabels=False, showgrid=False)
    fig.update_layout(coloraxis_showscale=False, margin=dict(l=0, r=0, t=30, b=0),
                      height=int(cell_px * ((n + cols - 1) // cols) + 30))
    return fig


def strategy_colours(names: Sequence[str], highlight: str | None = None) -> dict[str, str]:
    """The colour of each model, the same on every chart of the app and of the report:
    ``teacher`` grey, ``highlight`` (the student the page is about, kdcore.store.selection's
    best student by default on every page) blue, any other strategy its own fixed colour."""
    def fixed(name: str) -> str:
        return STRATEGY_COLOURS.get(name) or SERIES[zlib.crc32(name.encode()) % len(SERIES)]
    return {n: TEACHER if n == "teacher" else STUDENT if n == highlight else fixed(str(n))
            for n in names}


# Line styles that tell strategies apart where colour alone does not (the bias-aware variants'
# curves lie on top of each other, and two of their colours are greens).
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
STRATEGY_DASHES = {"ce": "dot", "kd": "solid", "kd+be": "dash", "kd+be+br": "dashdot",
                   "kd+be+br+dl": "longdash", "btkd": "longdashdot", "dkd": "dash"}


def strategy_dashes(names: Sequence[str]) -> dict[str, str]:
    """The line dash of each strategy, fixed per name like :func:`strategy_colours`."""
    return {n: STRATEGY_DASHES.get(str(n)) or DASHES[zlib.crc32(str(n).encode()) % len(DASHES)]
            for n in names}


def per_class_before_after(per_class: pd.DataFrame, *, title: str | None = None,
                           highlight: str | None = None) -> go.Figure:
    """Grouped bars of per-class accuracy: column ``class``, then one column per model.

    Colours from :func:`strategy_colours` (``highlight`` blue). Values are accuracies in
    [0, 1], e.g. ``kdcore.value.before_after.before_after``.
    """
    models = [c for c in per_class.columns if c != "class"]
    classes = per_class["class"].map(_plain)
    colours = strategy_colours(models, highlight)
    fig = go.Figure()
    for model in models:
        values = per_class[model].astype(float)
        fig.add_trace(go.Bar(
            x=classes, y=values, name=model, marker_color=colours[model],
            text=[f"{v:.0%}" if np.isfinite(v) else "" for v in values], textposition="outside",
            hovertemplate=f"{model}, class %{{x}}: %{{y:.1%}} right<extra></extra>"))
    fig.update_layout(barmode="group", bargap=0.2, bargroupgap=0.05)
    fig.update_xaxes(title_text="class", type="category")
    fig.update_yaxes(title_text="accuracy on held-out data", tickformat=".0%", range=[0, 1.12])
    return _finish(fig, title or "Per-class accuracy: teacher (before) vs student (after)",
                   height=420)


# --- runs and results
# Figures for the Train and Results pages, from ``kdcore.value.compare.summarise`` documents and
# ``RunStore.epochs`` frames. Accuracies stay fractions (axes format them as %); differences
# between accuracies are drawn in percentage points.

def _strategies(summary: dict) -> list[tuple[str, dict]]:
    entries = summary.get("strategies", {})
    return [(name, entries[name]) for name in strategy_order(list(entries))]


def strategy_accuracy_bars(summary: dict, highlight: str | None = None) -> go.Figure:
    """Mean last-epoch test accuracy per strategy, error bars one standard deviation over
    seeds, a dashed line at the teacher. ``summary`` is ``kdcore.value.compare.summarise(runs)``;
    each bar has its strategy's colour (``highlight`` blue).

    The axis starts a little below the lowest bar (differences are a few points), so the bars
    start there too and carry their value as text.
    """
    rows = _strategies(summary)
    names = [n for n, _ in rows]
    means = np.array([e["mean"] for _, e in rows], dtype=float)
    stds = np.array([e["std"] for _, e in rows], dtype=float)
    seeds = [len(e["seeds"]) for _, e in rows]
    teacher = summary.get("teacher_test_accuracy")
    lows = list(means - stds) + ([teacher] if teacher is not None else [])
    floor = max(0.0, float(np.floor((min(lows) - 0.03) * 20) / 20)) if lows else 0.0
    fig = go.Figure(go.Bar(
        x=names, y=means - floor, base=floor,
        marker_color=list(strategy_colours(names, highlight).values()),
        error_y=dict(type="data", array=stds, visible=True, color=TEACHER),
        text=[f"{m:.1%}" for m in means], textposition="inside", insidetextanchor="start",
        hovertext=[f"{m:.1%} ± {sd:.1%} over {n} seeds" if n > 1 else f"{m:.1%}, one seed"
                   for m, sd, n in zip(means, stds, seeds, strict=True)],  # no "± 0%"
        hovertemplate="%{x}: %{hovertext}<extra></extra>"))
    if teacher is not None:
        fig.add_hline(y=teacher, line_dash="dash", line_color=TEACHER,
                      annotation_text=f"teacher {teacher:.1%}", annotation_position="top left")
    fig.update_xaxes(title_text="training strategy", type="category")
    fig.update_yaxes(title_text="test accuracy, last epoch (axis not from 0)",
                     tickformat=".0%", range=[floor, 1.0])
    fig.update_layout(showlegend=False)
    return _finish(fig, "Student test accuracy per strategy (± std over seeds)", height=400)


def delta_vs_kd_chart(summary: dict) -> go.Figure:
    """Each strategy's paired difference to vanilla KD (same seeds), with its 95% interval.

    Green: the whole interval is above 0 (a real gain); red: below 0 (a real loss); grey: the
    interval includes 0 or there is one seed only (no interval).
    """
    rows = [(n, e) for n, e in _strategies(summary) if n != "kd" and e.get("delta_vs_kd")]
    fig = go.Figure()
    for name, entry in rows:
        delta = entry["delta_vs_kd"]
        mean, ci = 100 * delta["mean"], delta.get("ci95")
        lo, hi = (100 * ci[0], 100 * ci[1]) if ci else (mean, mean)
        colour = RIGHT if ci and lo > 0 else WRONG if ci and hi < 0 else TEACHER
        interval = f"95% interval {lo:+.1f} to {hi:+.1f}" if ci else "one seed: no interval"
        fig.add_trace(go.Scatter(
            x=[mean], y=[name], mode="markers", marker=dict(size=12, color=colour),
            error_x=dict(type="data", symmetric=False, array=[hi - mean],
                         arrayminus=[mean - lo], visible=bool(ci), color=colour, thickness=2),
            name=name, showlegend=False,
            hovertemplate=f"{name}: %{{x:+.1f}} points vs KD<br>{interval}<extra></extra>"))
    fig.add_vline(x=0, line_dash="dash", line_color=TEACHER,
                  annotation_text="same as vanilla KD", annotation_position="top")
    fig.update_xaxes(title_text="difference in test accuracy vs vanilla KD (percentage points)",
                     zeroline=False)
    fig.update_yaxes(title_text="", type="category", categoryorder="array",
                     categoryarray=[n for n, _ in rows][::-1])
    return _finish(fig, "Gain over vanilla KD on the same seeds (bars: 95% interval)",
                   height=max(260, 120 + 45 * len(rows)))


def per_class_change(df: pd.DataFrame, highlight: str | None = None) -> go.Figure:
    """Each student's per-class accuracy minus the teacher's, in points (the frame of
    :func:`per_class_before_after`, with its colours)."""
    students = [c for c in df.columns if c not in ("class", "teacher")]
    classes = df["class"].map(_plain)
    colours = strategy_colours(students, highlight)
    fig = go.Figure()
    for model in students:
        change = 100 * (df[model].astype(float) - df["teacher"].astype(float))
        fig.add_trace(go.Bar(
            x=classes, y=change, name=model, marker_color=colours[model],
            hovertemplate=f"{model}, class %{{x}}: %{{y:+.1f}} points vs the teacher"
                          "<extra></extra>"))
    fig.add_hline(y=0, line_color=TEACHER)
    fig.update_layout(barmode="group", bargap=0.2, bargroupgap=0.05)
    fig.update_xaxes(title_text="class", type="category")
    fig.update_yaxes(title_text="student minus teacher (points)")
    return _finish(fig, "Where the students beat the teacher (above 0) and where they fall behind",
                   height=380)


def bias_inheritance_bars(summary: dict) -> go.Figure:
    """Per strategy, the share of the teacher's test mistakes that the student repeats
    (same wrong class), mean over seeds. Lower is better.

    ``ce`` never sees the teacher, so its share is the floor: how often a student makes those
    mistakes on its own (the samples are hard). With ``ce`` trained, a dashed line marks that
    floor and each bar's label says its excess over it, what the teacher passed on.
    """
    rows = [(n, e) for n, e in _strategies(summary) if e.get("bias_inheritance") is not None]
    names = [n for n, _ in rows]
    values = [float(e["bias_inheritance"]) for _, e in rows]
    floor = next((v for n, v in zip(names, values, strict=True) if n == "ce"), None)
    labels = []
    for name, value in zip(names, values, strict=True):
        if floor is None:
            labels.append(f"{100 * value:.1f}%")
        elif name == "ce":
            labels.append(f"{100 * value:.1f}% (floor)")
        else:
            labels.append(f"{100 * value:.1f}% ({100 * (value - floor):+.1f} pts over ce)")
    fig = go.Figure(go.Bar(
        x=names, y=values, marker_color=WRONG, text=labels, textposition="outside",
        hovertemplate="%{x}: repeats %{y:.1%} of the teacher's mistakes<extra></extra>"))
    if floor is not None:
        fig.add_hline(y=floor, line_dash="dash", line_color=TEACHER)
    fig.update_xaxes(title_text="training strategy", type="category")
    fig.update_yaxes(title_text="teacher's test mistakes copied", tickformat=".0%",
                     range=[0, min(1.0, max(values, default=0.0) * 1.3) or 0.1])
    fig.update_layout(showlegend=False)
    fig = _finish(fig, "How many of the teacher's mistakes each student copies (lower is better)",
                  height=380)
    if floor is not None:
        fig.update_layout(margin=dict(t=80), title_subtitle_text=(
            f"dashed line: ce's {100 * floor:.1f}%, the floor (ce never sees the teacher); "
            "above it, what the teacher passed on"))
    return fig


# --- the decision
# Figures for the Results page's answer to "distil or not": per-class differences with their
# significance, the teacher-vs-student error map, and calibration. Inputs are the documents of
# ``kdcore.value.compare.summarise`` (differences are fractions, drawn in points) and the
# lists of ``kdcore.analysis.calibration.reliability``.

AGAINST = {"ce": "ce (labels alone)", "kd": "vanilla KD", "teacher": "the teacher"}
ALPHA = 0.05  # a per-class difference is significant at BH-adjusted p below this
# the four cells of an error map: (key, label, teacher right?, student right?)
ERROR_CELLS = (("both_right", "both right", True, True),
               ("newly_wrong", "newly wrong (student breaks)", True, False),
               ("fixed", "fixed (student repairs)", False, True),
               ("both_wrong", "both wrong", False, False))
_CELL_COLOURS = {"both_right": "#E8F1E8", "newly_wrong": WRONG, "fixed": RIGHT,
                 "both_wrong": TEACHER}


def _interval(ci: Sequence[float] | None) -> str:
    return "no interval (fewer than 2 seeds or no spread)" if not ci else (
        f"95% interval {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}")


def _p_text(p: float | None) -> str:
    if p is None or not np.isfinite(p):
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def per_class_significance(per_class: Sequence[dict], against: str = "ce", *,
                           strategy: str = "student", alpha: float = ALPHA) -> go.Figure:
    """Per class, the paired difference of ``strategy`` against ``against`` (``ce``, ``kd`` or
    ``teacher``) over seeds, in points, with its 95% interval; a class whose
    Benjamini-Hochberg adjusted p is below ``alpha`` is drawn large, green above 0 and red
    below; the others small and grey.

    ``per_class``: a strategy's ``per_class`` list of ``summarise`` (``{"class",
    "delta_vs_<against>": {mean, ci95} | None, "p_adjusted_vs_<against>"}``). Classes without a
    difference are left out and counted in the subtitle.
    """
    if against not in AGAINST:
        raise ValueError(f"against must be one of {sorted(AGAINST)}")
    groups: dict[str, list] = {"better": [], "worse": [], "unclear": []}
    missing = 0
    for row in per_class:
        delta = row.get(f"delta_vs_{against}")
        if not delta or delta.get("mean") is None or not np.isfinite(delta["mean"]):
            missing += 1
            continue
        p = row.get(f"p_adjusted_vs_{against}")
        mean, ci = 100 * float(delta["mean"]), delta.get("ci95")
        significant = p is not None and np.isfinite(p) and p < alpha
        kind = ("better" if mean > 0 else "worse") if significant else "unclear"
        lo, hi = (100 * ci[0], 100 * ci[1]) if ci else (mean, mean)
        groups[kind].append((_plain(row["class"]), mean, lo, hi,
                             f"class {_plain(row['class'])}: {mean:+.1f} points against "
                             f"{AGAINST[against]}<br>{_interval(ci)}<br>BH-adjusted p "
                             f"{_p_text(p)}"))
    fig = go.Figure()
    styles = {"better": ("significantly better", RIGHT, 12, "circle"),
              "worse": ("significantly worse", WRONG, 12, "circle"),
              "unclear": ("no significant difference", TEACHER, 7, "circle-open")}
    classes = [_plain(r["class"]) for r in per_class]
    for kind, (name, colour, size, symbol) in styles.items():
        points = groups[kind]
        if not points:
            continue
        x, mean, lo, hi, hover = (list(v) for v in zip(*points, strict=True))
        fig.add_trace(go.Scatter(
            x=x, y=mean, mode="markers", name=f"{name} ({len(points)})",
            marker=dict(size=size, color=colour, symbol=symbol),
            error_y=dict(type="data", symmetric=False,
                         array=[h - m for h, m in zip(hi, mean, strict=True)],
                         arrayminus=[m - lo_ for m, lo_ in zip(mean, lo, strict=True)],
                         color=colour, thickness=1.5, width=3),
            hovertext=hover, hoverinfo="text"))
    fig.add_hline(y=0, line_dash="dash", line_color=TEACHER)
    fig.update_xaxes(title_text="class", type="category", categoryorder="array",
                     categoryarray=classes)
    fig.update_yaxes(title_text=f"difference vs {AGAINST[against]} (points)")
    fig = _finish(fig, f"Per class: {strategy} against {AGAINST[against]} (bars: 95% interval)",
                  height=400)
    n = sum(len(v) for v in groups.values())
    sub = (f"{len(groups['better'])} of {n} classes significantly better, "
           f"{len(groups['worse'])} significantly worse (Benjamini-Hochberg, p < {alpha:g})")
    if missing:
        sub += f"; {missing} without a difference"
    fig.update_layout(title_subtitle_text=_plain(sub), margin=dict(t=90))
    return fig


def error_map_counts(masks: dict) -> dict[str, int]:
    """The four cells of an error map as counts, from the boolean masks of
    ``kdcore.analysis.metrics.error_map`` (``both_wrong``, ``fixed``, ``newly_wrong``); the
    samples in none of them are right for both."""
    arrays = {k: np.asarray(masks[k], dtype=bool) for k in ("both_wrong", "fixed", "newly_wrong")}
    n = len(arrays["both_wrong"])
    right = ~(arrays["both_wrong"] | arrays["fixed"] | arrays["newly_wrong"])
    return {"both_right": int(right.sum()), **{k: int(v.sum()) for k, v in arrays.items()},
            "total": n}


def error_map_chart(counts: dict, *, strategy: str = "student",
                    seed: int | None = None) -> go.Figure:
    """Teacher (rows: right, wrong) against the student (columns: right, wrong) on the test
    split: both right, newly wrong (the student breaks what the teacher got right), fixed
    (the student gets right what the teacher got wrong), both wrong.

    ``counts``: ``both_wrong``, ``fixed``, ``newly_wrong`` and optionally ``both_right``
    (:func:`error_map_counts`). An invisible marker on each non-empty cell carries
    ``customdata = [cell index in ERROR_CELLS]`` so a click selects the cell.
    """
    values = [int(counts.get(key) or 0) for key, *_ in ERROR_CELLS]
    total = sum(values)
    rows, cols = ["teacher right", "teacher wrong"], ["student right", "student wrong"]
    z = np.array([[0, 1], [2, 3]], dtype=float)
    text = np.empty((2, 2), dtype=object)
    hover = np.empty((2, 2), dtype=object)
    for i, (_, label, teacher_ok, student_ok) in enumerate(ERROR_CELLS):
        r, c = (0 if teacher_ok else 1), (0 if student_ok else 1)
        share = values[i] / total if total else 0.0
        text[r, c] = f"<b>{label}</b><br>{values[i]:,} ({100 * share:.1f}%)"
        hover[r, c] = f"{label}: {values[i]:,} of {total:,} test samples ({100 * share:.1f}%)"
    colours = [_CELL_COLOURS[key] for key, *_ in ERROR_CELLS]
    scale = [[stop, colour] for i, colour in enumerate(colours)
             for stop in (i / 4, (i + 1) / 4)]
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=rows, text=text, texttemplate="%{text}", hovertext=hover,
        hoverinfo="text", colorscale=scale, zmin=-0.5, zmax=3.5, showscale=False, xgap=3,
        ygap=3, textfont=dict(size=14)))
    cells = [(i, key) for i, (key, *_) in enumerate(ERROR_CELLS) if values[i]]
    fig.add_trace(go.Scatter(
        x=[cols[0 if ERROR_CELLS[i][3] else 1] for i, _ in cells],
        y=[rows[0 if ERROR_CELLS[i][2] else 1] for i, _ in cells], mode="markers",
        marker=dict(symbol="square", size=90, color="rgba(0,0,0,0)"),
        selected=dict(marker=dict(color="rgba(0,0,0,0)")),
        unselected=dict(marker=dict(opacity=1)),
        customdata=[[i] for i, _ in cells],
        hovertext=[hover[0 if ERROR_CELLS[i][2] else 1, 0 if ERROR_CELLS[i][3] else 1]
                   for i, _ in cells], hoverinfo="text", showlegend=False, name="cells"))
    fig.update_xaxes(type="category", side="top", showgrid=False)
    fig.update_yaxes(type="category", autorange="reversed", showgrid=False)
    fig.update_layout(plot_bgcolor="white", clickmode="event+select")
    which = f"{strategy}, seed {seed}" if seed is not None else strategy
    return _finish(fig, f"Teacher against student ({which}) on {total:,} test samples",
                   height=360)


def calibration_reliability(curves: dict[str, dict], *,
                            highlight: str | None = None) -> go.Figure:
    """Reliability diagrams of the teacher and students on one chart: per confidence bin,
    how often the model was right against how sure it said it was. The diagonal is perfect
    calibration; below it, more sure than right.

    ``curves``: model name -> ``kdcore.analysis.calibration.reliability`` (lists
    ``bin_lower``, ``bin_upper``, ``confidence``, ``accuracy``, ``count``); empty bins are
    skipped. Colours of :func:`strategy_colours` (``teacher`` grey, ``highlight`` blue).
    """
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated",
                             line=dict(color=SUPPORT, dash="dash"), hoverinfo="skip"))
    colours = strategy_colours(list(curves), highlight)
    for name, curve in curves.items():
        frame = pd.DataFrame({k: curve[k] for k in ("bin_lower", "bin_upper", "confidence",
                                                    "accuracy", "count")})
        frame = frame[frame["count"] > 0]
        label = _plain(name)
        fig.add_trace(go.Scatter(
            x=frame["confidence"], y=frame["accuracy"], mode="lines+markers", name=label,
            line=dict(color=colours[name], width=2.5 if name in ("teacher", highlight) else 1.5,
                      dash="dot" if name == "teacher" else "solid"),
            marker=dict(size=7),
            customdata=np.stack([frame["count"], frame["bin_lower"], frame["bin_upper"]], 1)
            if len(frame) else None,
            hovertemplate=(f"{label}, confidence %{{customdata[1]:.0%}}–%{{customdata[2]:.0%}}: "
                           "%{customdata[0]} samples, said %{x:.1%} sure, right %{y:.1%}"
                           "<extra></extra>")))
    fig.update_xaxes(title_text="confidence in the predicted class", tickformat=".0%",
                     range=[0, 1.02])
    fig.update_yaxes(title_text="how often it was right", tickformat=".0%", range=[0, 1.02])
    fig = _finish(fig, "Can the models' confidence be trusted? (pooled over seeds)", height=420)
    fig.update_layout(title_subtitle_text="points below the dashed line: more sure than right",
                      margin=dict(t=80), legend=dict(orientation="v", yanchor="top", y=1.0,
                                                     xanchor="left", x=1.02))
    return fig


def learning_curves(df: pd.DataFrame, *, per_seed: bool = False, metric: str = "test_accuracy",
                    highlight: str | None = None) -> go.Figure:
    """Test accuracy per epoch: per strategy the mean over seeds with a band from the lowest
    to the highest seed, or (``per_seed``) one line per seed; colours of
    :func:`strategy_colours`.

    ``df``: columns ``strategy``, ``seed``, ``epoch`` (0-based) and ``metric``, one row per
    run and epoch.
    """
    fig = go.Figure()
    names = strategy_order(list(df["strategy"].unique())) if len(df) else []
    colours, dashes = strategy_colours(names, highlight), strategy_dashes(names)
    for name in names:
        colour = colours[name]
        part = df[df["strategy"] == name]
        if per_seed:
            for j, (seed, run) in enumerate(part.groupby("seed", sort=True)):
                fig.add_trace(go.Scatter(
                    x=run["epoch"] + 1, y=run[metric], mode="lines", name=name,
                    line=dict(color=colour, width=1.5, dash=dashes[name]), legendgroup=name,
                    showlegend=j == 0,
                    hovertemplate=f"{name}, seed {seed}, epoch %{{x}}: %{{y:.1%}}"
                                  "<extra></extra>"))
            continue
        band = part.groupby("epoch")[metric].agg(["mean", "min", "max"]).reset_index()
        x = band["epoch"] + 1
        fig.add_trace(go.Scatter(
            x=pd.concat([x, x[::-1]]), y=pd.concat([band["max"], band["min"][::-1]]),
            fill="toself", fillcolor=colour, opacity=0.15, line=dict(width=0),
            legendgroup=name, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(
            x=x, y=band["mean"], mode="lines", name=name,
            line=dict(color=colour, width=2.5, dash=dashes[name]),
            legendgroup=name,
            hovertemplate=f"{name}, epoch %{{x}}: %{{y:.1%}} (mean)<extra></extra>"))
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="test accuracy", tickformat=".0%")
    how = "one line per seed" if per_seed else "mean over seeds, band: lowest to highest seed"
    return _finish(fig, f"Test accuracy during training ({how})", height=420)


def job_curves(df: pd.DataFrame) -> go.Figure:
    """Training loss and test accuracy per epoch, side by side, as runs train.

    ``df``: ``RunStore.epochs(run_id)`` (columns ``epoch``, ``loss``, ``test_accuracy``, ...)
    for one run, or several runs' rows with a ``job`` column naming each (one line per job,
    the same colour in both panels).
    """
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("training loss", "test accuracy"))
    jobs = list(df.groupby("job", sort=False)) if "job" in df else [("", df)]
    for i, (job, part) in enumerate(jobs):
        colour = SERIES[i % len(SERIES)] if len(jobs) > 1 else STUDENT
        x = part["epoch"] + 1
        mode = "lines+markers" if len(part) <= 40 else "lines"
        name = job or "this run"
        for col, metric, label in ((1, "loss", "loss %{y:.3g}"), (2, "test_accuracy", "%{y:.1%}")):
            if metric in part:
                fig.add_trace(go.Scatter(
                    x=x, y=part[metric], mode=mode, name=name, legendgroup=name,
                    showlegend=col == 1 and len(jobs) > 1, line=dict(color=colour, width=1.5),
                    marker=dict(size=4),
                    hovertemplate=f"{name}, epoch %{{x}}: {label}<extra></extra>"), row=1, col=col)
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(tickformat=".0%", row=1, col=2)
    fig = _finish(fig, "", height=330 if len(jobs) > 1 else 230)
    fig.update_layout(margin=dict(l=10, r=10, t=30, b=10),
                      legend=dict(orientation="h", x=0, xanchor="left", y=-0.3, yanchor="top"))
    return fig


# --- roi
# Figures for the ROI page, from ``kdcore.value.roi.strategy_points`` frames and
# ``kdcore.value.roi`` documents. Size and latency axes are logarithmic: a teacher is often
# 100x the student.

_ROI_AXES = {
    "params": ("size: parameters (log scale)", "size"),
    "size_bytes": ("size on disk (bytes, log scale)", "size on disk"),
    "latency_ms_p50": ("latency at batch 1, median ms (log scale)", "latency"),
}


def _log_ticks(lo: float, hi: float) -> tuple[list[float], list[float]]:
    """A log-axis range around [lo, hi] and readable 1-2-5 ticks inside it."""
    pad = 0.3 + 0.25 * (np.log10(hi) - np.log10(lo))  # room for the labels on both sides
    left, right = np.log10(lo) - pad, np.log10(hi) + 0.2 + 0.1 * pad
    ticks = [m * 10.0 ** k for k in range(int(np.floor(left)), int(np.ceil(right)) + 1)
             for m in (1, 2, 5) if left <= np.log10(m * 10.0 ** k) <= right]
    return [left, right], ticks


def _tick_text(value: float, column: str) -> str:
    if column == "params":
        for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
            if value >= scale:
                return f"{value / scale:g}{unit}"
        return f"{value:g}"
    if column == "size_bytes":
        for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if value >= scale:
                return f"{value / scale:g} {unit}"
        return f"{value:g} B"
    return f"{value:g} ms"


def roi_scatter(points: pd.DataFrame, x: str = "size_bytes",
                highlight: str | None = None) -> go.Figure:
    """Accuracy against size (``x="params"``, parameters; ``x="size_bytes"``, bytes on disk)
    or latency (``x="latency_ms_p50"``): the teacher as a grey diamond, each student strategy
    as a dot in its colour (``highlight``, the measured student, blue) with ± std over seeds.

    ``points``: ``kdcore.value.roi.strategy_points`` (columns ``model``, ``kind``, ``accuracy``,
    ``accuracy_std``, ``seeds``, ``size_bytes``, ``latency_ms_p50``, ...). Every strategy
    trains the same architecture, so the students share one x; labels alternate sides.
    """
    if x not in _ROI_AXES:
        raise ValueError(f"x must be one of {sorted(_ROI_AXES)}")
    title_x, what = _ROI_AXES[x]
    fig = go.Figure()
    teacher = points[points["kind"] == "teacher"]
    students = points[points["kind"] == "student"].reset_index(drop=True)
    unit = {"latency_ms_p50": "ms", "params": "parameters"}.get(x, "bytes")
    if len(teacher):
        fig.add_trace(go.Scatter(
            x=teacher[x], y=teacher["accuracy"], mode="markers+text", name="teacher",
            text=["teacher"], textposition="top center",
            marker=dict(size=16, color=TEACHER, symbol="diamond"),
            hovertemplate=f"teacher: %{{y:.1%}} at %{{x:,.4g}} {unit}<extra></extra>"))
    if len(students):
        ranked = students["accuracy"].rank(method="first").astype(int)
        sides = ["middle right" if r % 2 else "middle left" for r in ranked]
        fig.add_trace(go.Scatter(
            x=students[x], y=students["accuracy"], mode="markers+text",
            name="students (one per strategy)", text=students["model"], textposition=sides,
            error_y=dict(type="data", array=students["accuracy_std"], visible=True,
                         color=SUPPORT, thickness=1),
            customdata=np.stack([students["accuracy_std"], students["seeds"]], 1),
            hovertemplate=("%{text}: %{y:.1%} ± %{customdata[0]:.1%} over %{customdata[1]} "
                           f"seeds at %{{x:,.4g}} {unit}<extra></extra>"),
            marker=dict(size=11, color=list(strategy_colours(students["model"].tolist(),
                                                             highlight).values()))))
    values = points[x].astype(float)
    values = values[values > 0]
    if len(values):
        axis_range, ticks = _log_ticks(float(values.min()), float(values.max()))
        fig.update_xaxes(type="log", range=axis_range, tickvals=ticks,
                         ticktext=[_tick_text(v, x) for v in ticks])
    fig.update_xaxes(title_text=title_x)
    fig.update_yaxes(title_text="test accuracy (mean over seeds)", tickformat=".0%")
    return _finish(fig, f"Accuracy against {what} (better: up and left)", height=420)


def roi_cost_bars(cost: dict, student: str = "student") -> go.Figure:
    """Monthly serving cost of the teacher and the student from a ``kdcore.value.roi`` ``cost``
    object (``teacher_monthly``, ``student_monthly``, ``saving_monthly``)."""
    values = [float(cost["teacher_monthly"]), float(cost["student_monthly"])]
    fig = go.Figure(go.Bar(
        x=["teacher", f"student ({student})"], y=values, marker_color=[TEACHER, STUDENT],
        text=[format_money(v) for v in values], textposition="outside",
        hovertemplate="%{x}: $%{y:,.4g} a month<extra></extra>"))
    top = max(values) if max(values) > 0 else 1.0
    fig.update_yaxes(title_text="serving cost, $ a month", tickprefix="$", range=[0, top * 1.25])
    fig.update_layout(showlegend=False, bargap=0.45)
    saving = float(cost["saving_monthly"])
    what = (f"saving {format_money(saving)}" if saving >= 0
            else f"the student costs {format_money(-saving)} more")
    return _finish(fig, f"Monthly serving cost ({what} a month)", height=360)


def cost_per_million_bars(per_million: dict, student: str = "student") -> go.Figure:
    """Dollars per million predictions of the teacher and the student, each bar the median over
    the repeated measurements with its 95% interval as an error bar, from a ``kdcore.value.roi``
    ``cost_per_million`` object (``teacher``, ``student``, ``saving``: ``{median, ci95}``)."""
    sides = [per_million["teacher"], per_million["student"]]
    values = [float(s["median"]) for s in sides]
    cis = [s.get("ci95") or [s["median"], s["median"]] for s in sides]
    names = ["teacher", f"student ({student})"]
    fig = go.Figure(go.Bar(
        x=names, y=values, marker_color=[TEACHER, STUDENT],
        error_y=dict(type="data", symmetric=False, visible=True, color="#333333",
                     array=[hi - v for v, (_, hi) in zip(values, cis, strict=True)],
                     arrayminus=[v - lo for v, (lo, _) in zip(values, cis, strict=True)]),
        customdata=[[format_money(v), format_money(lo), format_money(hi)]
                    for v, (lo, hi) in zip(values, cis, strict=True)],
        hovertemplate="%{x}: %{customdata[0]} per million predictions, 95% interval "
                      "%{customdata[1]} to %{customdata[2]}<extra></extra>"))
    fig.add_trace(go.Scatter(  # each median written above its whisker, clear of it
        x=names, y=[hi for _, hi in cis], mode="text", text=[format_money(v) for v in values],
        textposition="top center", showlegend=False, hoverinfo="skip"))
    top = max(max(hi for _, hi in cis), max(values))
    fig.update_yaxes(title_text="$ per million predictions", tickprefix="$",
                     range=[0, (top if top > 0 else 1.0) * 1.25])
    fig.update_xaxes(title_text="bars: median; whiskers: 95% interval over the measurements")
    fig.update_layout(showlegend=False, bargap=0.45)
    saving = per_million["saving"]
    what = (f"saving {format_money(saving['median'])}" if saving["median"] >= 0
            else f"the student costs {format_money(-saving['median'])} more")
    return _finish(fig, f"Serving cost per million predictions ({what})", height=380)
