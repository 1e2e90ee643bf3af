"""The exportable report: one self-contained HTML file (Plotly's JavaScript inlined, opens
offline) with the teacher-bias analysis, the before/after comparison of the students, the ROI
table with its cost assumptions, the configs and seeds behind every number, the date and the
version.

    kdcore report [BUNDLE] [--run ID ...] --out report.html
    kdcore report --format pdf --out report.pdf      # needs Chromium and the kaleido package
    kdcore report --format png --out charts.png      # one PNG per chart: charts-01-....png

``build_report`` collects the numbers and the figures; ``render_html`` turns them into the page;
``write_report`` writes the file in the format asked for. With no finished students (an empty
store) the report holds the teacher-bias analysis only and says so.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import plotly
import torch

from kdcore import __version__
from kdcore.analysis.analyzer import report as bias_report
from kdcore.analysis.analyzer import select
from kdcore.data.bundles import Bundle, load_bundle
from kdcore.data.images import is_image_source, open_images
from kdcore.data.sources import bundle_table
from kdcore.data.tables import PredictionTable
from kdcore.errors import DataError, KDCoreError
from kdcore.store import selection
from kdcore.store.runs import Run, RunStore
from kdcore.value import figures
from kdcore.value.before_after import before_after, shown_students
from kdcore.value.compare import BASELINE, summarise
from kdcore.value.formatting import format_interval, format_money, format_payback
from kdcore.value.predictions import load_test_predictions
from kdcore.value.recommend import latest_recommendation
from kdcore.value.roi import (
    CostAssumptions,
    is_image_run,
    roi,
    roi_table,
    run_dataset,
    strategy_points,
    with_assumptions,
)

FORMATS = ("html", "pdf", "png")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
NO_STUDENTS = ("No students were trained yet: this report holds the teacher-bias analysis "
               "only. Run `kdcore demo` (or the Train page) and export the report again.")


@dataclass
class Chart:
    """One of the dashboard's figures (kdcore.value.figures), on a white page."""

    slug: str
    title: str
    figure: figures.Figure

    def __post_init__(self) -> None:
        # the template itself, not its name: a figure built without validation
        # (figures._spec_figure) keeps a name as a plain string, which plotly.io cannot render
        self.figure.update_layout(template=plotly.io.templates["plotly_white"])


@dataclass
class ImageFolder:
    """The image folder (or CIFAR folder) image runs were trained on, named as a bundle is.
    Its teacher is not run again: the report reads its held-out predictions from a run's saved
    test predictions."""

    path: Path
    manifest: dict = field(default_factory=dict)
    data_options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class ReportData:
    """Everything the page shows, computed once."""

    bundle: Bundle | ImageFolder
    generated_at: str
    workspace: str
    splits: dict                      # split -> {n_samples, teacher_accuracy or None}
    per_class: pd.DataFrame           # held-out per-class bias table
    top_confusions: pd.DataFrame
    runs: list[Run] = field(default_factory=list)
    summary: dict | None = None
    roi: dict | None = None
    roi_error: str | None = None
    charts: list[Chart] = field(default_factory=list)
    selection: str = ""
    recommendation: dict | None = None  # the latest `kdcore recommend` on the bundle


# --------------------------------------------------------------------------- choosing runs


def select_runs(store: RunStore, bundle: Bundle | None = None,
                run_ids: Sequence[str] | None = None) -> tuple[list[Run], Bundle, str]:
    """The finished runs the report summarises (one comparison of kdcore.store.selection), their
    bundle, and how they were chosen.

    With ``run_ids``: each run brings in every finished seed of its strategy in its comparison,
    and the runs must be comparable. Without: the comparison the dashboard shows first on the
    bundle (the demo's, else the largest).
    """
    done = store.list(status="done")
    if not run_ids:
        bundle = bundle or load_bundle(None)
        groups = selection.comparable_groups(selection.on_bundle(done, bundle.path))
        key = selection.headline(groups, bundle.path)
        how = (f"every strategy of the comparison {key} (the demo's runs if finished, else the "
               "largest set of runs trained with the same settings), with every finished seed")
        return _ordered(groups[key] if key else []), bundle, how
    chosen: dict[str, Run] = {}
    run_bundle: Bundle | None = None
    for run_id in run_ids:
        run = store.get(run_id)
        if run.status != "done":
            raise DataError(f"run {run.id} is {run.status}, not done; pass finished runs "
                            "(`kdcore runs` lists them)")
        this = ImageFolder(Path(run.config["bundle"])) if is_image_run(run) else run_dataset(run)
        if run_bundle is None:
            run_bundle = this
        elif Path(this.path) != Path(run_bundle.path):
            raise DataError(f"run {run.id} is on {this.name}, the others on {run_bundle.name}; "
                            "a report covers one bundle")
        chosen.update({r.id: r for r in selection.recipe(done, run)})
    if bundle is not None and Path(bundle.path) != Path(run_bundle.path):
        raise DataError(f"the runs are on {run_bundle.path}, not {bundle.path}; drop BUNDLE")
    groups = selection.comparable_groups(list(chosen.values()))
    if not any(len(group) == len(chosen) for group in groups.values()):
        raise DataError(f"the runs given were trained with different settings ({'; '.join(groups)}"
                        "); a report covers one comparison: pass runs with the same settings")
    how = "the runs given with --run, each with every finished seed of the same settings"
    return _ordered(list(chosen.values())), run_bundle, how


def _ordered(runs: Sequence[Run]) -> list[Run]:
    """Strategies in reading order, each by seed."""
    return [r for group in selection.by_strategy(runs).values() for r in group]


# --------------------------------------------------------------------------- collecting


def build_report(store: RunStore, bundle: str | Path | Bundle | None = None,
                 run_ids: Sequence[str] | None = None, *,
                 assumptions: CostAssumptions | None = None, threads: int = 1,
                 roi_doc: dict | None = None) -> ReportData:
    """Collect the numbers and the charts of the report.

    The ROI is measured now, priced under ``assumptions``; or, with ``roi_doc`` (a measured
    ``kdcore.value.roi.roi`` document, e.g. the ROI page's) of a student among the reported
    runs, that measurement is reported as it is, re-priced under ``assumptions`` when given,
    so the report says what the page says."""
    if bundle is not None and not isinstance(bundle, (Bundle, ImageFolder)):
        bundle = (ImageFolder(open_images(bundle).root) if is_image_source(bundle)
                  else load_bundle(bundle))
    runs, bundle, how = select_runs(store, bundle, run_ids)
    table = (_held_out_table(store, bundle, runs) if isinstance(bundle, ImageFolder)
             else bundle_table(bundle))
    splits = {}
    for name in table.splits:
        part = table.subset(name)
        labelled = bool((part.labels >= 0).any())
        splits[name] = {"n_samples": part.n_samples,
                        "teacher_accuracy": bias_report(part).accuracy if labelled else None}
    held_out = bias_report(select(table, "test" if "test" in table.splits else None))
    data = ReportData(
        bundle=bundle, generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        workspace=str(store.workspace), splits=splits, per_class=held_out.per_class,
        top_confusions=held_out.top_confusions, runs=runs, selection=how)
    data.recommendation = latest_recommendation(store.workspace, bundle.path,
                                                bundle.data_options)
    data.charts.append(Chart("teacher-bias", "Teacher bias per class",
                             figures.bias_rate_bars(held_out.per_class)))
    data.charts.append(Chart("teacher-confusion", "Teacher's confusions",
                             figures.error_confusion_heatmap(held_out.error_confusion,
                                                             held_out.class_names)))
    if not runs:
        return data
    data.summary = summarise(runs, store)
    best = selection.best_student(runs)
    data.charts.append(Chart("strategies", "Accuracy per strategy",
                             figures.strategy_accuracy_bars(data.summary, best)))
    data.charts.append(Chart("per-class", "Per-class before/after", figures.per_class_before_after(
        before_after(store, runs, shown_students(runs)), highlight=best,
        title="Per-class accuracy on held-out data: teacher (before) vs students (after, mean "
              "over seeds)")))
    student = selection.closest_to_mean(selection.by_strategy(runs)[best])
    try:
        if roi_doc is not None and roi_doc.get("run_id") in {r.id for r in runs}:
            data.roi = with_assumptions(roi_doc, assumptions) if assumptions else roi_doc
        else:
            data.roi = roi(store, None if isinstance(bundle, ImageFolder) else bundle, student.id,
                           assumptions=assumptions, threads=threads)
    except KDCoreError as exc:
        data.roi_error = str(exc)
    else:
        data.charts.append(Chart("cost", "Serving cost per million predictions",
                                 figures.cost_per_million_bars(data.roi["cost_per_million"],
                                                               data.roi["strategy"])))
        data.charts.append(Chart("accuracy-latency", "Accuracy against latency",
                                 figures.roi_scatter(strategy_points(data.roi, runs),
                                                     "latency_ms_p50", highlight=best)))
    return data


def _held_out_table(store: RunStore, folder: ImageFolder, runs: Sequence[Run]) -> PredictionTable:
    """The teacher's held-out predictions on an image folder, from the first run's saved test
    predictions (every run of one comparison saves the same teacher's)."""
    if not runs:
        raise DataError(f"{folder.path}: no finished runs on this image folder; train some "
                        "first (kdcore compare IMAGES --student ARCH ...)")
    preds = load_test_predictions(store, runs[0])
    return PredictionTable(source=folder.name, class_names=preds.class_names,
                           outputs=np.asarray(preds.teacher_logits, dtype=np.float32),
                           kind="logits", labels=np.asarray(preds.labels, dtype=np.int64),
                           split=np.full(len(preds.labels), "test", dtype=object),
                           sample_id=None, extra=None)


# --------------------------------------------------------------------------- rendering

_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 color:#222;max-width:1100px;margin:0 auto;padding:24px 28px 60px;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.1em}h2{margin-top:1.8em;border-bottom:2px solid #eee;
 padding-bottom:.2em}h3{margin-top:1.3em}
.meta{color:#666;font-size:.92em}.note{background:#f4f8fc;border-left:4px solid #1F77B4;
 padding:.6em 1em;margin:1em 0}.warn{background:#fff6e5;border-left:4px solid #E69F00;
 padding:.6em 1em;margin:1em 0}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.92em}
th,td{border-bottom:1px solid #e3e3e3;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#fafafa}td.num,th.num{text-align:right}
.chart{margin:1em 0 1.6em;page-break-inside:avoid;break-inside:avoid}
.chart img{max-width:100%}
.kpis{display:flex;gap:14px;flex-wrap:wrap;margin:1em 0}
.kpi{border:1px solid #e3e3e3;border-radius:6px;padding:.5em .9em;min-width:150px}
.kpi b{display:block;font-size:1.4em}code{background:#f3f3f3;padding:0 3px;border-radius:3px}
@media print{body{max-width:none;padding:0 8px}h2{page-break-after:avoid}}
"""


def _e(text) -> str:
    return html.escape(str(text))


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, escape=True, na_rep="—")


def _kpis(items: Sequence[tuple[str, str]]) -> str:
    return '<div class="kpis">' + "".join(
        f'<div class="kpi">{_e(label)}<b>{_e(value)}</b></div>' for label, value in items
    ) + "</div>"


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.1%}"


def _pts(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}"


def _delta(delta: dict | None, unit: str = " pts") -> str:
    """"+0.7 pts [+0.3, +1.2]", the interval left out when there is none, "—" for no delta."""
    if not delta:
        return "—"
    ci = delta.get("ci95")
    return f"{_pts(delta['mean'])}{unit}" + (f" [{_pts(ci[0])}, {_pts(ci[1])}]" if ci else
                                            " (no interval)")


def _answer(value: bool | None) -> str:
    return "yes" if value is True else "no" if value is False else "cannot tell"


def _decision_html(summary: dict) -> str:
    """The three answers of the decision, each with its interval."""
    d = summary.get("decision")
    if not d:
        return ""
    best = d.get("best_strategy")
    level = d.get("ci_level") or 0.95
    best_text = "—" if best is None else (
        "ce: train on labels alone" if best == "ce" else best)
    rows = [
        {"question": "Does distillation beat training on labels alone (ce)?",
         "answer": _answer(d.get("distil")),
         "evidence": ("—" if not d.get("delta_vs_ce") else
                      f"{d.get('best_distilled')} vs ce: {_delta(d['delta_vs_ce'])}, "
                      f"{level:.1%} interval ({d.get('adjustment')})")},
        {"question": "Which strategy is best?", "answer": best_text,
         "evidence": ("—" if best not in summary["strategies"] else
                      f"{summary['strategies'][best]['mean']:.1%} test accuracy, mean over "
                      f"{len(summary['strategies'][best]['seeds'])} seeds")},
        {"question": "Does it beat its teacher?", "answer": _answer(d.get("beats_teacher")),
         "evidence": ("—" if not d.get("delta_vs_teacher") else
                      f"{_delta(d['delta_vs_teacher'])} vs the teacher, 95% interval")},
    ]
    note = f'<p class="meta">{_e(d["note"])}</p>' if d.get("note") else ""
    return "<h3>The decision</h3>" + _table(pd.DataFrame(rows)) + note


def _classes_html(summary: dict) -> str:
    """The classes distillation hurts and the classes it fixes, with their intervals."""
    classes = summary.get("classes") or {}
    if not classes.get("against"):
        return ""
    against = {"ce": "ce (labels alone)", "kd": "vanilla KD"}.get(classes["against"],
                                                                 classes["against"])
    out = [f"<h3>Per class: {_e(classes.get('strategy'))} against {_e(against)}</h3>",
           '<p class="meta">Paired difference in per-class test accuracy over seeds, 95% '
           "interval; only classes significant after the Benjamini-Hochberg correction across "
           "classes (adjusted p &lt; 0.05) are listed.</p>"]
    for key, title in (("hurts", "Classes distillation hurts"), ("fixes", "Classes it fixes")):
        items = classes.get(key) or []
        if not items:
            out.append(f"<p><b>{title}:</b> none significant.</p>")
            continue
        out.append(f"<p><b>{title}</b></p>" + _table(pd.DataFrame([
            {"class": item["class"], "difference (95% interval)": _delta(item.get("delta")),
             "adjusted p": "—" if item.get("p_adjusted") is None
             else f"{item['p_adjusted']:.3f}"} for item in items])))
    return "".join(out)


def _calibration_html(summary: dict) -> str:
    """ECE, NLL and Brier of the teacher and of each strategy (mean over seeds)."""
    cal = summary.get("calibration")
    if not cal:
        return ""
    rows = []
    for name, scores in [("teacher", cal.get("teacher")), *(cal.get("strategies") or {}).items()]:
        scores = scores or {}
        rows.append({"model": name, "ECE": _pct(scores.get("ece")),
                     "NLL": "—" if scores.get("nll") is None else f"{scores['nll']:.3f}",
                     "Brier": "—" if scores.get("brier") is None else f"{scores['brier']:.3f}"})
    return ("<h3>Calibration: can the confidence be trusted?</h3>" + _table(pd.DataFrame(rows))
            + '<p class="meta">ECE: 15 equal-width bins of the top-class confidence. NLL: mean '
              "negative log-probability of the true class. Brier: per sample the sum over "
              "classes of the squared error against the one-hot label, then the mean. Students: "
              "mean over seeds; lower is better for all three.</p>")


def _error_map_html(summary: dict) -> str:
    """Per strategy, the test samples both get wrong, the student fixes and newly breaks."""
    rows = [{"strategy": name, "both wrong": e["error_map"].get("both_wrong"),
             "fixed (teacher wrong, student right)": e["error_map"].get("fixed"),
             "newly wrong (teacher right, student wrong)": e["error_map"].get("newly_wrong"),
             "seeds": len(e["seeds"])}
            for name, e in summary["strategies"].items() if e.get("error_map")]
    if not rows:
        return ""
    return ("<h3>Teacher against student: error map</h3>" + _table(pd.DataFrame(rows))
            + '<p class="meta">Test samples, counts pooled (summed) over the seeds.</p>')


def roi_kpis(doc: dict) -> list[tuple[str, str]]:
    """The ROI's headline figures in the order the ROI page gives them: when serving cost is
    negligible at the traffic, the payback first; else the cost per million predictions."""
    per_million, back = doc.get("cost_per_million"), doc.get("payback_predictions") or {}
    money = ([("saving per million predictions", format_interval(per_million["saving"]))]
             if per_million else [])
    payback = [("payback, in predictions", format_payback(back))] if back else []
    lead = (payback + money) if doc.get("negligible") else (money + payback)
    return lead + [
        ("smaller (parameters)", f"{doc['params_ratio']:,.0f}x"),
        ("faster (batch 1, p50)", f"{doc['speedup']:,.1f}x"),
        ("accuracy change", f"{doc['accuracy_change'] * 100:+.1f} pts"),
        ("saving a month", format_interval({"median": doc["cost"]["saving_monthly"],
                                            "ci95": doc["cost"].get("saving_monthly_ci95")})),
    ]


def _recommendation_html(doc: dict | None) -> str:
    """The latest recipe search (``kdcore recommend``): its answer and every candidate."""
    if not doc:
        return ""
    rows = [{"recipe": r["recipe"], "test accuracy (mean)": _pct(r["mean"]), "seeds": r["seeds"],
             "dropped": ("survived" if r["round_dropped"] == "survived"
                         else f"round {r['round_dropped']}"),
             "vs leader when dropped (Holm)": _delta(r["delta_vs_leader"])}
            for r in doc["ranking"]]
    return ("<h3>Recipe search</h3>"
            f'<p class="note">{_e(doc["summary"])}</p>' + _table(pd.DataFrame(rows))
            + '<p class="meta">Successive halving (<code>kdcore recommend</code>, finished '
            f"{_e(doc.get('finished_at', ''))}): each round adds a seed to the recipes still in "
            "the race and drops those whose paired interval against the leader, Holm-adjusted, "
            "lies below zero.</p>")


def render_html(data: ReportData, *, static: dict[str, str] | None = None) -> str:
    """The report as one HTML document. ``static`` maps a chart slug to a data: URL image
    (for print); otherwise the charts are interactive, Plotly's JavaScript inlined once."""
    charts = {c.slug: c for c in data.charts}
    first = [True]

    def chart(slug: str) -> str:
        if slug not in charts:
            return ""
        c = charts[slug]
        if static is not None:
            return (f'<div class="chart"><img alt="{_e(c.title)}" src="{static[slug]}"></div>')
        div = c.figure.to_html(full_html=False, include_plotlyjs=first[0],
                               config={"displaylogo": False, "responsive": True},
                               default_width="100%",
                               default_height=f"{c.figure.layout.height or 420}px")
        first[0] = False
        return f'<div class="chart" id="chart-{_e(slug)}">{div}</div>'

    b = data.bundle
    out: list[str] = []
    out.append(f"<h1>kdcore report: {_e(b.name)}</h1>")
    out.append(f'<p class="meta">Generated {_e(data.generated_at)} by kdcore {_e(__version__)} '
               f"(torch {_e(torch.__version__)}, plotly {_e(plotly.__version__)}) from the "
               f"workspace <code>{_e(data.workspace)}</code>. "
               f"Bundle <code>{_e(b.path)}</code>.</p>")
    if b.manifest.get("description"):
        out.append(f"<p>{_e(b.manifest['description'])}</p>")

    # ---- teacher bias
    out.append("<h2>1. Where the teacher is wrong</h2>")
    meaning = {"train": "labelled distillation data", "unlabelled": "transfer data, no labels",
               "test": "held-out data"}
    out.append(_table(pd.DataFrame([
        {"split": name, "what it is": meaning.get(name, name), "samples": s["n_samples"],
         "teacher accuracy": _pct(s["teacher_accuracy"]) if s["teacher_accuracy"] is not None
         else "no labels"} for name, s in data.splits.items()])))
    out.append(chart("teacher-bias"))
    out.append(chart("teacher-confusion"))
    if len(data.top_confusions):
        top = data.top_confusions.head(8).copy()
        top["share"] = top["share"].map(_pct)
        out.append("<h3>Most frequent mistakes (held-out)</h3>" + _table(top.rename(columns={
            "true": "true class", "predicted": "teacher said", "count": "samples",
            "share": "share of errors"})))
    per_class = data.per_class[["class", "support", "teacher_accuracy", "bias_rate",
                                "most_confused_with"]].copy()
    per_class["most_confused_with"] = per_class["most_confused_with"].fillna("—")
    for col in ("teacher_accuracy", "bias_rate"):
        per_class[col] = per_class[col].map(_pct)
    out.append("<h3>Per class (held-out)</h3>" + _table(per_class.rename(columns={
        "teacher_accuracy": "teacher accuracy", "bias_rate": "bias rate",
        "most_confused_with": "most often read as"})))

    # ---- students
    out.append("<h2>2. Before and after: the students</h2>")
    if not data.summary:
        out.append(f'<p class="warn">{_e(NO_STUDENTS)}</p>')
    else:
        out.append(f'<p class="note"><b>Verdict.</b> {_e(data.summary["verdict"])}</p>')
        out.append(_decision_html(data.summary))
        rows = []
        for name, e in data.summary["strategies"].items():
            d = e["delta_vs_kd"]
            ci = d["ci95"] if d else None
            rows.append({
                "strategy": name,
                "test accuracy (mean ± std)": f"{e['mean']:.1%} ± {e['std']:.1%}",
                "vs kd, paired (95% interval)": "" if not d or name == BASELINE else (
                    f"{d['mean'] * 100:+.1f} pts" + (f" [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]"
                                                     if ci else "")),
                "vs ce, paired (95% interval)": ("" if name == "ce" or not e.get("delta_vs_ce")
                                                 else _delta(e["delta_vs_ce"])),
                "copies teacher errors": _pct(e["bias_inheritance"]),
                "excess over ce": ("" if name == "ce" or e.get("excess_inheritance") is None
                                   else f"{_pts(e['excess_inheritance'])} pts"),
                "best-epoch accuracy": _pct(e["best_epoch_mean"]),
                "seeds": ", ".join(str(s) for s in e["seeds"]),
            })
        out.append(_table(pd.DataFrame(rows)))
        out.append('<p class="meta">Test accuracy is the last epoch, averaged over seeds. '
                   "Best-epoch accuracy picks the epoch on the test set, so it is optimistic. "
                   "&ldquo;Copies teacher errors&rdquo;: of the held-out samples the teacher "
                   "gets wrong, the share the student gets wrong with the same wrong class; ce "
                   "never sees the teacher, so its share is the floor, and a strategy's excess "
                   "over it is what the teacher passed on.</p>")
        out.append(chart("strategies"))
        out.append(chart("per-class"))
        out.append(_classes_html(data.summary))
        out.append(_calibration_html(data.summary))
        out.append(_error_map_html(data.summary))

    out.append(_recommendation_html(data.recommendation))

    # ---- ROI
    out.append("<h2>3. Return on investment: size, speed and cost</h2>")
    if not data.summary:
        out.append(f'<p class="warn">{_e(NO_STUDENTS)}</p>')
    elif data.roi is None:
        out.append(f'<p class="warn">The ROI could not be measured: {_e(data.roi_error)}</p>')
    else:
        doc = data.roi
        out.append(f'<p class="note">{_e(doc["summary"])}</p>')
        out.append(_kpis(roi_kpis(doc)))
        out.append(f"<p>Student measured: run <code>{_e(doc['run_id'])}</code> "
                   f"({_e(doc['strategy'])}); its accuracy is the mean over the seeds "
                   f"{_e(', '.join(str(s) for s in doc['student']['seeds']))}.</p>")
        out.append(_table(roi_table(doc)))
        a = doc["cost"]["assumptions"]
        m = doc["measurement"]
        out.append("<h3>Assumptions</h3>" + _table(pd.DataFrame([
            {"assumption": "requests per month", "value": f"{a['requests_per_month']:,.0f}"},
            {"assumption": "cost per hour of the serving machine",
             "value": format_money(a["cost_per_hour"])},
            {"assumption": "utilisation (busy share of billed time)",
             "value": f"{a['utilisation']:.0%}"},
            {"assumption": "cost model", "value": a["model"]},
            {"assumption": "measured on",
             "value": (f"this machine ({m['machine']}), {m['device']}, {m['threads']} thread(s), "
                       f"torch {m['torch']}; {m['latency_calls']} timed calls at batch 1 after "
                       f"{m['warmup_calls']} warm-up calls, {m['throughput_calls']} at batch "
                       f"{m['throughput_batch']}; {m['mode']}")},
        ])))
        out.append(chart("cost"))
        out.append(chart("accuracy-latency"))

    # ---- configs and seeds
    out.append("<h2>4. Configs and seeds</h2>")
    if not data.runs:
        out.append("<p>No runs: nothing was trained in this workspace yet.</p>")
    else:
        out.append(f"<p>Runs included: {_e(data.selection)}.</p>")
        configs = [r.config for r in data.runs]
        keys = sorted({k for c in configs for k in c})
        shared = {k: configs[0].get(k) for k in keys
                  if all(json.dumps(c.get(k), sort_keys=True)
                         == json.dumps(configs[0].get(k), sort_keys=True) for c in configs)}
        varying = [k for k in keys if k not in shared and k not in ("seed", "strategy")]
        out.append("<h3>Settings shared by every run</h3>" + _table(pd.DataFrame(
            [{"setting": k, "value": json.dumps(v) if not isinstance(v, str) else v}
             for k, v in shared.items()])))
        rows = []
        by_strategy: dict[str, list[Run]] = {}
        for r in data.runs:
            by_strategy.setdefault(r.strategy, []).append(r)
        for name, group in by_strategy.items():
            row = {"strategy": name}
            for k in varying:
                value = group[0].config.get(k)
                row[k] = value if isinstance(value, str) else json.dumps(value)
            row["seeds"] = ", ".join(str(r.seed) for r in group)
            row["run ids"] = ", ".join(r.id for r in group)
            rows.append(row)
        out.append("<h3>Per strategy: settings that differ, seeds and runs</h3>"
                   + _table(pd.DataFrame(rows)))
    out.append(f'<p class="meta">kdcore {_e(__version__)} &middot; {_e(data.generated_at)}</p>')
    body = "\n".join(part for part in out if part)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>kdcore report: {_e(b.name)}</title><style>{_CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n")


# --------------------------------------------------------------------------- static output


def find_browser() -> str | None:
    """A Chromium-family browser: $BROWSER_PATH, else the first on PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).is_file():
        return env
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def static_renderer_problem() -> str | None:
    """None when png/pdf output can be made here; else what is missing and the fix."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return ("--format png/pdf needs the kaleido package: `pip install kaleido` (it drives "
                "the system's Chromium); --format html needs neither")
    if find_browser() is None:
        return ("--format png/pdf needs Chromium or Chrome (e.g. `apt-get install chromium`, "
                "or set BROWSER_PATH); --format html needs no browser")
    return None


def render_images(charts: Sequence[Chart], fmt: str, folder: Path) -> list[Path]:
    """Each chart rendered by kaleido (one browser session for all) into ``folder``."""
    import plotly.io as pio

    problem = static_renderer_problem()
    if problem:
        raise DataError(problem)
    os.environ.setdefault("BROWSER_PATH", find_browser())
    paths = [folder / f"{i:02d}-{c.slug}.{fmt}" for i, c in enumerate(charts, 1)]
    if not charts:
        return []
    try:
        pio.write_images([c.figure for c in charts], paths, format=fmt, width=1000)
    except Exception as exc:  # kaleido raises many kinds; say what happened in one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise KDCoreError(f"rendering the charts with kaleido and {find_browser()} failed: "
                          f"{type(exc).__name__}: {first}; use --format html") from None
    return paths


def _print_pdf(html_file: Path, out: Path) -> None:
    browser = find_browser()
    with tempfile.TemporaryDirectory(prefix="kdcore-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", f"--user-data-dir={profile}", "--no-pdf-header-footer",
               f"--print-to-pdf={out}", html_file.resolve().as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KDCoreError(f"printing the PDF with {browser} failed ({exc}); use --format "
                              "html") from None
    if proc.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise KDCoreError(f"printing the PDF with {browser} failed: {tail[0]}; use --format html")


def write_report(data: ReportData, out: str | Path, fmt: str = "html") -> list[Path]:
    """Write the report; returns the files written.

    ``html``: one self-contained interactive file. ``pdf``: the same page with the charts
    rendered statically by kaleido, printed to one PDF by Chromium. ``png``: one PNG per chart,
    named ``<out stem>-NN-<chart>.png`` next to ``out``.
    """
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give a file name such as {out / 'report.html'}")
    if not out.parent.exists():
        raise DataError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    if fmt == "html":
        out.write_text(render_html(data), encoding="utf-8")
        return [out]
    problem = static_renderer_problem()
    if problem:
        raise DataError(problem)
    if fmt == "png":
        stem = out.stem if out.suffix.lower() == ".png" else out.name
        written = []
        with tempfile.TemporaryDirectory(prefix="kdcore-report-") as tmp:
            for path in render_images(data.charts, "png", Path(tmp)):
                target = out.parent / f"{stem}-{path.name}"
                shutil.move(str(path), target)
                written.append(target)
        return written
    with tempfile.TemporaryDirectory(prefix="kdcore-report-") as tmp:
        tmp = Path(tmp)
        static = {}
        for chart, path in zip(data.charts, render_images(data.charts, "svg", tmp), strict=True):
            static[chart.slug] = ("data:image/svg+xml;base64,"
                                  + base64.b64encode(path.read_bytes()).decode("ascii"))
        page = tmp / "report.html"
        page.write_text(render_html(data, static=static), encoding="utf-8")
        _print_pdf(page, out.resolve())
    return [out]


def report_html(store: RunStore, bundle: str | Path | Bundle | None = None,
                run_ids: Sequence[str] | None = None, **options) -> str:
    """The HTML report in one call (what the dashboard's "Download report" button serves)."""
    return render_html(build_report(store, bundle, run_ids, **options))


def report_download(store: RunStore, **options) -> bytes:
    """The HTML report as bytes for a download; a problem becomes a one-line page saying what
    went wrong and the fix, so a download never fails silently."""
    try:
        return report_html(store, **options).encode("utf-8")
    except KDCoreError as exc:
        return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>kdcore report"
                f"</title></head><body><p>The report could not be built: {_e(exc)}</p>"
                "</body></html>").encode()
