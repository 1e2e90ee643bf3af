"""The exportable report: content, offline self-containment, the CLI, and a real browser."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from kdcore import __version__
from kdcore.cli import main
from kdcore.store.runs import RunStore
from kdcore.value.report import (
    NO_STUDENTS,
    build_report,
    render_html,
    static_renderer_problem,
    write_report,
)
from kdcore.value.roi import CostAssumptions

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def full_report(trained, tmp_path_factory) -> Path:
    ws, _ = trained
    data = build_report(RunStore(ws), assumptions=CostAssumptions(requests_per_month=5e6))
    out = tmp_path_factory.mktemp("out") / "report.html"
    write_report(data, out)
    return out


@pytest.fixture(scope="module")
def empty_report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("empty")
    out = root / "report.html"
    write_report(build_report(RunStore(root / "ws")), out)
    return out


def _no_network_references(text: str) -> None:
    assert not re.search(r"<script[^>]+src=", text), "a script is loaded from outside the file"
    assert not re.search(r"<link[^>]+href=\"https?:", text)


def test_empty_store_report_is_bias_analysis_only(empty_report):
    text = empty_report.read_text(encoding="utf-8")
    assert "No students were trained yet" in text and "kdcore demo" in text
    assert "Where the teacher is wrong" in text
    assert text.count('class="plotly-graph-div"') == 2  # bias bars and confusion only
    assert "Return on investment" in text and "Student measured" not in text
    _no_network_references(text)


def test_full_report_has_every_part(full_report, trained):
    _, runs = trained
    text = full_report.read_text(encoding="utf-8")
    _no_network_references(text)
    assert text.count("plotly.js v") >= 1  # the library is inlined ...
    assert len(text) > 1_000_000  # ... in full
    assert text.count('class="plotly-graph-div"') == 6
    assert NO_STUDENTS not in text
    for needed in ("Verdict.", "kd+be+br+dl", "serialized size", "latency, batch 1, p50",
                   "throughput, batch 32", "requests per month", "5,000,000",
                   "utilisation (busy share of billed time)", "cost model",
                   "Settings shared by every run", "epochs", f"kdcore {__version__}"):
        assert needed in text, needed
    for run in runs:
        assert run.id in text  # the runs behind the numbers
    assert re.search(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC", text)


def test_report_for_given_runs_brings_their_seeds(trained):
    ws, runs = trained
    kd = next(r for r in runs if r.strategy == "kd")
    data = build_report(RunStore(ws), run_ids=[kd.id[:18]])  # a unique id prefix is enough
    assert {r.strategy for r in data.runs} == {"kd"}
    assert sorted(r.seed for r in data.runs) == [0, 1]
    assert data.roi["strategy"] == "kd"  # no bias-aware run given: the best given one
    html = render_html(data)
    assert "the runs given with --run" in html


def test_cli_report(trained, tmp_path, capsys):
    ws, _ = trained
    out = tmp_path / "r.html"
    code = main(["report", "--workspace", str(ws), "--out", str(out), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["files"] == [str(out)] and doc["students_trained"] is True
    assert doc["roi_run_id"] and out.stat().st_size > 1_000_000


def test_cli_report_empty_store_says_so(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "--workspace", str(tmp_path / "ws"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert str(out) in captured.out
    assert "no students were trained yet" in captured.err
    assert NO_STUDENTS in out.read_text(encoding="utf-8")


def test_cli_report_bad_input(tmp_path, capsys):
    code = main(["report", "--workspace", str(tmp_path / "ws"),
                 "--out", str(tmp_path / "missing" / "r.html")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = main(["report", "--workspace", str(tmp_path / "ws"), "--run", "nosuchrun",
                 "--out", str(tmp_path / "r.html")])
    assert code == 2 and "nosuchrun" in capsys.readouterr().err


def test_static_formats_without_a_browser_say_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium on PATH
    problem = static_renderer_problem()
    assert problem and ("Chromium" in problem or "kaleido" in problem)
    code = main(["report", "--workspace", str(tmp_path / "ws"), "--format", "pdf",
                 "--out", str(tmp_path / "r.pdf")])
    err = capsys.readouterr().err
    assert code == 2 and ("Chromium" in err or "kaleido" in err)
    assert "--format html" in err
    assert not (tmp_path / "r.pdf").exists()
    # the format follows --out's suffix when --format is not given
    code = main(["report", "--workspace", str(tmp_path / "ws"), "--out", str(tmp_path / "r.png")])
    assert code == 2 and "--format html" in capsys.readouterr().err


# --------------------------------------------------------------------------- real browser


def _browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    return playwright


def _rendered(path: Path) -> tuple[list[bool], list[str], list[str]]:
    """Open the file offline (every http/https request aborted); per chart: did it draw?"""
    sync_api = _browser()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            requested: list[str] = []
            errors: list[str] = []

            def block(route):
                requested.append(route.request.url)
                route.abort()

            page.route(re.compile(r"^https?://"), block)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(path.resolve().as_uri(), wait_until="load")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.plotly-graph-div')]"
                ".every(d => d.querySelector('svg.main-svg'))", timeout=15_000)
            drawn = page.evaluate(
                "() => [...document.querySelectorAll('.plotly-graph-div')]"
                ".map(d => !!d.querySelector('svg.main-svg'))")
        finally:
            browser.close()
    return drawn, requested, errors


@pytest.mark.browser
def test_report_renders_every_chart_offline(full_report):
    drawn, requested, errors = _rendered(full_report)
    assert len(drawn) == 6 and all(drawn)
    assert requested == [] and errors == []


@pytest.mark.browser
def test_empty_report_renders_offline(empty_report):
    drawn, _, errors = _rendered(empty_report)
    assert drawn == [True, True] and errors == []


@pytest.mark.browser
def test_png_charts_with_kaleido(tmp_path):
    if static_renderer_problem() or shutil.which("chromium") is None:
        pytest.skip(static_renderer_problem() or "no chromium on PATH")
    data = build_report(RunStore(tmp_path / "ws"))
    written = write_report(data, tmp_path / "charts.png", "png")
    assert [p.name for p in written] == ["charts-01-teacher-bias.png",
                                         "charts-02-teacher-confusion.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overview_has_a_download_report_button(tmp_path, monkeypatch):
    import sys

    from streamlit.testing.v1 import AppTest

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path / "ws"))
    # AppTest leaves the page script as __main__; spawned workers of later tests would run it
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    at = AppTest.from_file(str(root / "dashboard" / "app_pages" / "overview.py"),
                           default_timeout=60).run()
    assert not at.exception
    buttons = at.get("download_button")
    assert len(buttons) == 1 and buttons[0].proto.label == "Download report"


def test_report_download_bytes_match_the_cli_report(trained, tmp_path):
    from kdcore.value.report import report_download

    ws, _ = trained
    page = report_download(RunStore(ws)).decode("utf-8")
    assert page.count('class="plotly-graph-div"') == 6 and "Return on investment" in page
    broken = report_download(RunStore(ws), run_ids=["nosuchrun"]).decode("utf-8")
    assert "could not be built" in broken and "nosuchrun" in broken


# --------------------------------------------------------------------------- the decision

EVIL = "<script>alert(1)</script>"


def _summary() -> dict:
    """A hand-made ``summarise`` document: ce wins, one class hurt (with a hostile name)."""
    def entry(mean, **extra):
        return {"mean": mean, "std": 0.01, "seeds": [0, 1, 2], "per_seed": [mean] * 3,
                "best_epoch_mean": mean, "bias_inheritance": 0.3, "student_params": 100,
                "run_ids": [], "delta_vs_kd": None, "delta_vs_ce": None,
                "delta_vs_teacher": None, "excess_inheritance": None, "per_class": [],
                "error_map": {"both_wrong": 5, "fixed": 7, "newly_wrong": 11}, **extra}
    return {
        "teacher_test_accuracy": 0.9,
        "strategies": {
            "ce": entry(0.92),
            "kd": entry(0.9, delta_vs_ce={"mean": -0.02, "ci95": [-0.031, -0.009]},
                        excess_inheritance=0.104)},
        "decision": {"distil": False, "best_strategy": "ce", "best_distilled": "kd",
                     "delta_vs_ce": {"mean": -0.02, "ci95": [-0.031, -0.009]},
                     "beats_teacher": None, "ci_level": 0.95, "adjustment": "holm, best of 1",
                     "delta_vs_teacher": {"mean": 0.02, "ci95": None}, "note": None},
        "calibration": {"teacher": {"ece": 0.0412, "nll": 0.31, "brier": 0.15},
                        "strategies": {"ce": {"ece": 0.1, "nll": 0.5, "brier": 0.2},
                                       "kd": None}},
        "classes": {"strategy": "kd", "against": "ce",
                    "hurts": [{"class": EVIL, "delta": {"mean": -0.2, "ci95": [-0.3, -0.1]},
                               "p_adjusted": 0.012, "against": "ce"}],
                    "fixes": []},
        "verdict": "Do not distil: ce beats kd.",
    }


def test_report_states_the_decision_classes_calibration_and_error_map(tmp_path):
    data = build_report(RunStore(tmp_path / "ws"))
    data.summary = _summary()
    text = render_html(data)
    for needed in ("The decision", "Does distillation beat training on labels alone (ce)?",
                   "ce: train on labels alone", "Does it beat its teacher?", "cannot tell",
                   "kd vs ce: -2.0 pts [-3.1, -0.9], 95.0% interval (holm, best of 1)",
                   "+2.0 pts (no interval) vs the teacher",
                   "Per class: kd against ce (labels alone)", "Classes distillation hurts",
                   "-20.0 pts [-30.0, -10.0]", "0.012", "Classes it fixes:</b> none significant",
                   "Calibration: can the confidence be trusted?", "4.1%", "0.310", "0.150",
                   "Teacher against student: error map", "newly wrong (teacher right",
                   "+10.4 pts"):
        assert needed in text, needed
    assert EVIL not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert ">None<" not in text and " nan" not in text
    calibration = text[text.index("Calibration: can"):text.index("Teacher against student")]
    assert calibration.count("—") == 3  # kd's scores are unknown: a dash each, never "None"


def test_full_report_has_the_decision_sections(full_report):
    text = full_report.read_text(encoding="utf-8")
    for needed in ("The decision", "Does distillation beat training on labels alone (ce)?",
                   "ce (training on labels alone) was not trained",  # the note: no ce here
                   "Calibration: can the confidence be trusted?",
                   "Teacher against student: error map"):
        assert needed in text, needed
