"""User text is shown as text, and a bad input is one line, never a traceback (issue 13, item 8).

Class names that carry Plotly's pseudo-HTML stay literal in the charts and the report, ANSI
escapes in class names do not reach the terminal, a line break inside a quoted CSV header name
is named as such, and a bad upload limit or a malformed bundle is one st.error in the browser.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from kdcore import cli
from kdcore.analysis.analyzer import report
from kdcore.data.bundles import sample_bundle_path
from kdcore.data.tables import read_prediction_table
from kdcore.errors import DataError
from kdcore.store.runs import RunStore
from kdcore.value import figures
from kdcore.value.report import build_report, render_html

PAGES = Path(__file__).resolve().parents[1] / "dashboard" / "app_pages"
LINK = '<a href="x">a</a>'
HOSTILE = [LINK, '<span style="color:red">b</span>', "<b>c</b>", "\x1b[31mred\x1b[0m"]
MARKUP = ("<a href", "<a ", "<span", "<b>", "</a>")


def hostile_csv(tmp_path: Path) -> Path:
    """A prediction table whose class names hold pseudo-HTML and an ANSI escape."""
    rng = np.random.default_rng(0)
    y = np.arange(80) % len(HOSTILE)
    logits = rng.normal(size=(80, len(HOSTILE)))
    logits[np.arange(80), y] += 1.0
    frame = pd.DataFrame(logits, columns=[f"logit_{c}" for c in HOSTILE])
    frame.insert(0, "label", [HOSTILE[i] for i in y])
    path = tmp_path / "hostile.csv"
    frame.to_csv(path, index=False)
    return path


def strings(node) -> list[str]:
    """Every string in a figure's JSON (data and layout)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return []


def test_class_names_stay_text_in_every_figure(tmp_path):
    table = read_prediction_table(hostile_csv(tmp_path))
    rep = report(table)
    names = rep.class_names
    accuracy = pd.DataFrame({"class": names, "teacher": 0.5, "kd": 0.6})
    built = [
        figures.bias_rate_bars(rep.per_class),
        figures.error_confusion_heatmap(rep.error_confusion, names),
        figures.top_confusions_bar(rep.top_confusions),
        figures.probability_bars(names, np.full(4, 0.25), np.full(4, 0.25), true_class=0,
                                 title=f"#{LINK}: true {LINK}, teacher said {names[1]}"),
        figures.per_class_before_after(accuracy, title=LINK),
        figures.per_class_change(accuracy),
        figures.image_grid(np.zeros((1, 8, 8)), [LINK]),
    ]
    for fig in built:
        shown = strings(json.loads(fig.to_json()))
        assert not [s for s in shown if any(m in s for m in MARKUP)], fig.layout.title.text
        assert any("&lt;a href=\"x\"&gt;a&lt;/a&gt;" in s for s in shown), fig.layout.title.text


def test_report_keeps_class_names_as_text(tmp_path):
    bundle = tmp_path / "hostile_bundle"
    shutil.copytree(sample_bundle_path(), bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["class_names"][:len(HOSTILE)] = HOSTILE
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    page = render_html(build_report(RunStore(tmp_path / "ws"), bundle))
    # the tables escape as HTML; the charts' JSON writes "<" as \u003c, so look for both forms
    assert LINK not in page and "\\u003ca href" not in page
    assert "\\u003cspan" not in page and "\\u003cb\\u003e" not in page
    assert "&lt;a href=\\\"x\\\"&gt;a&lt;\\u002fa&gt;" in page  # a chart's label, escaped


def test_cli_text_output_has_no_terminal_escapes(tmp_path, workspace, capsys):
    assert cli.main(["analyze", str(hostile_csv(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\\x1b[31mred" in out  # shown, written out


def test_cli_error_messages_have_no_terminal_escapes(monkeypatch, capsys):
    def fails(args):
        raise DataError("manifest.json: class '\x1b[2J\x1b[31mzero' is bad; fix it")

    monkeypatch.setattr(cli, "cmd_analyze", fails)
    assert cli.main(["analyze"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[2J" in err
    assert err.count("\n") == 1


def test_line_break_in_a_quoted_header_name_is_named():
    data = b'label,"logit_a\nx",logit_b\n0,1.0,2.0\n1,0.5,0.1\n'
    with pytest.raises(DataError) as caught:
        read_prediction_table(data, name="t.csv")
    message = str(caught.value)
    assert "\n" not in message
    assert "column 'logit_a\\nx'" in message and "line break" in message


# ---------------------------------------------------------------- the dashboard


def page(name: str) -> AppTest:
    return AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=60)


def one_line_errors(at: AppTest) -> list[str]:
    assert not at.exception, at.exception[0].message if at.exception else ""
    texts = [e.value for e in at.error]
    assert texts and all("\n" not in t and "Traceback" not in t for t in texts), texts
    return texts


@pytest.mark.parametrize("value", ["nan", "inf", "-5", "0", "lots"])
def test_a_bad_upload_limit_is_one_error(value, workspace, monkeypatch):
    monkeypatch.setenv("KDCORE_MAX_UPLOAD_MB", value)
    texts = one_line_errors(page("data").run())
    assert any("KDCORE_MAX_UPLOAD_MB" in t and "200" in t for t in texts), texts


def _bad_bundle(workspace: Path, kind: str) -> str:
    folder = workspace / "bundles" / f"bad_{kind}"
    shutil.copytree(sample_bundle_path(), folder)
    if kind == "string_labels":
        with np.load(folder / "data.npz") as z:
            arrays = dict(z)
        arrays["y_test"] = arrays["y_test"].astype(str)
        np.savez(folder / "data.npz", **arrays)
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest.update({"class_names": 5} if kind == "class_names"
                        else {"training_defaults": "fast"})
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder.name


@pytest.mark.parametrize("kind", ["string_labels", "class_names", "training_defaults"])
def test_a_malformed_bundle_is_one_error_on_every_page(kind, workspace):
    name = _bad_bundle(workspace, kind)
    for page_name, key in (("data", "data_bundle"), ("teacher_bias", "bias_source"),
                           ("train", "train_bundle")):
        at = page(page_name).run()
        assert not at.exception, page_name
        next(s for s in at.selectbox if s.key == key).select(name).run()
        assert one_line_errors(at), page_name
