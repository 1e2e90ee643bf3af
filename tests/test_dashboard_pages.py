"""AppTest checks of the dashboard's Overview, Teacher bias and Data pages (and the router)."""

from __future__ import annotations

import io
import sys
import types
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from kdcore.analysis.analyzer import report, select
from kdcore.data.bundles import load_bundle
from kdcore.data.sources import load_predictions
from kdcore.errors import DataError
from kdcore.store.runs import RunStore
from kdcore.value.compare import plan, run_all
from kdcore_app import state

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "dashboard" / "app_pages"
TIMEOUT = 60


def page(name: str) -> AppTest:
    return AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runs_home(tmp_path_factory) -> Path:
    """A workspace with a few finished tiny runs on the bundled sample."""
    home = tmp_path_factory.mktemp("ws_runs")
    store = RunStore(home)
    configs = plan(load_bundle(None), ["ce", "kd", "kd+be+br+dl"], range(2), epochs=2)
    # AppTest leaves the last page script as __main__; spawned workers must not re-run it
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        run_all(store, configs, workers=1)
    finally:
        sys.modules["__main__"] = main
        store.close()
    return home


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path / "ws"))
    return tmp_path / "ws"


@pytest.fixture
def with_runs(runs_home, monkeypatch) -> Path:
    monkeypatch.setenv("KDCORE_HOME", str(runs_home))
    return runs_home


class FakeUpload(io.BytesIO):
    """What st.file_uploader returns, enough for the Data page."""

    def __init__(self, name: str, data: bytes) -> None:
        super().__init__(data)
        self.name, self.size, self.file_id = name, len(data), f"{name}-{len(data)}"


# ---------------------------------------------------------------- overview


def test_overview_empty_store_offers_the_demo(empty_home):
    at = page("overview").run()
    assert not at.exception
    assert [b.label for b in at.button] == ["Run the demo"]
    assert not at.error


def test_overview_with_runs_shows_headline_numbers(with_runs):
    at = page("overview").run()
    assert not at.exception
    labels = [m.label for m in at.metric]
    assert labels[0] == "Teacher accuracy"
    assert any(label.startswith("Best student") for label in labels)
    assert "Student size (parameters)" in labels
    assert at.info and at.info[0].value  # the verdict sentence
    assert not at.button  # no demo button once runs are finished


# ---------------------------------------------------------------- teacher bias


def _plotly_count(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def test_teacher_bias_renders_and_reacts_to_split(empty_home):
    at = page("teacher_bias").run()
    assert not at.exception and not at.error
    test_rep = report(select(load_predictions(None), "test"))
    assert at.metric[0].value == f"{test_rep.accuracy:.1%}"
    assert _plotly_count(at) >= 5  # bias bars, heatmap, samples, pairs, confidence charts
    at.radio(key="bias_split").set_value("train").run()
    assert not at.exception
    train_rep = report(select(load_predictions(None), "train"))
    assert at.metric[3].value == f"{train_rep.n_samples:,}"
    at.radio(key="bias_split").set_value("all").run()
    assert not at.exception
    assert at.metric[3].value == f"{train_rep.n_samples + test_rep.n_samples:,}"


def test_teacher_bias_manual_filter_and_normalise(empty_home):
    at = page("teacher_bias").run()
    at.toggle(key="bias_normalise").set_value(True).run()
    assert not at.exception
    at.selectbox(key="bias_true").set_value(4)
    at.selectbox(key="bias_pred").set_value(9).run()
    assert not at.exception
    assert any("samples match" in c.value for c in at.caption)
    at.selectbox(key="bias_true").set_value(0)
    at.selectbox(key="bias_pred").set_value(0).run()
    assert not at.exception
    assert any("No samples match" in i.value for i in at.info)


def test_teacher_bias_on_an_uploaded_table(empty_home):
    table = state.validate_upload("mine.csv", state.example_csv("test"))
    at = page("teacher_bias")
    at.session_state[state.UPLOADS] = {"mine.csv (uploaded)": table}
    at.session_state[state.UPLOAD_TOKENS] = {"mine.csv (uploaded)": "t1"}
    at.run()
    at.selectbox(key="bias_source").set_value("mine.csv (uploaded)").run()
    assert not at.exception and not at.error
    assert at.metric[3].value == f"{table.n_samples:,}"


# ---------------------------------------------------------------- data


def test_upload_validation_reports_the_fix():
    with pytest.raises(DataError, match="logit_"):
        state.validate_upload("bad.csv", b"label,foo\n1,2\n")
    table = state.validate_upload("good.csv", state.example_csv("test"))
    assert table.n_samples > 0 and table.splits == ["test"]


def test_data_page_rejects_a_bad_upload_and_accepts_a_good_one(empty_home, monkeypatch):
    upload = {"file": None}
    monkeypatch.setattr(st, "file_uploader", lambda *a, **k: upload["file"])
    at = page("data").run()
    assert not at.exception and not at.error
    upload["file"] = FakeUpload("bad.csv", b"label,foo\n1,2\n")
    at.run()
    assert not at.exception
    assert at.error and "bad.csv" in at.error[0].value and "logit_" in at.error[0].value
    upload["file"] = FakeUpload("good.csv", state.example_csv("test"))
    at.run()
    assert not at.exception and not at.error
    assert "good.csv (uploaded)" in at.session_state[state.UPLOADS]


# ---------------------------------------------------------------- router


def test_router_renders_every_page(with_runs):
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=TIMEOUT).run()
    assert not at.exception
    for name in ("teacher_bias", "data", "overview"):
        at.switch_page(f"app_pages/{name}.py").run()
        assert not at.exception, name

