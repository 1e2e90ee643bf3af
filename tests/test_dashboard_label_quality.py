"""AppTest checks of the Teacher bias page's label-error split: bars, heatmap kind, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from kdcore.data.sources import load_predictions, source_key
from kdcore.store.overrides import load_overrides
from kdcore_app import state

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "dashboard" / "app_pages" / "teacher_bias.py"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path / "ws"))
    return tmp_path / "ws"


def _page() -> AppTest:
    return AppTest.from_file(str(PAGE), default_timeout=90)


def _charts(at: AppTest) -> str:
    return " ".join(c.proto.spec for c in at.get("plotly_chart"))


def _verdict_boxes(at: AppTest):
    return [s for s in at.selectbox if str(s.key or "").startswith("bias_verdict_")]


def test_split_bars_and_override_control_on_the_sample(home):
    at = _page().run()
    assert not at.exception and not at.error
    assert any("Trust the label or the teacher?" in m.value for m in at.markdown)
    assert "likely label errors" in _charts(at)  # the stacked bars' second kind
    boxes = _verdict_boxes(at)
    assert boxes and boxes[0].value == "detected"
    for kind in ("label_error", "teacher_bias", "all"):
        at.segmented_control(key="bias_heatmap_kind").set_value(kind).run()
        assert not at.exception


def test_an_override_is_stored_and_shown(home):
    at = _page()
    at.run()
    at.radio(key="bias_split").set_value("train").run()
    box = _verdict_boxes(at)[0]
    key = box.key
    box.set_value("label_error").run()
    assert not at.exception
    stored = load_overrides(home, source_key(load_predictions(None)))
    assert list(stored.values()) == ["label_error"] and key.endswith(next(iter(stored)))
    assert any("verdicts are yours" in m.value for m in at.markdown)
    at.selectbox(key=key).set_value("detected").run()
    assert load_overrides(home, source_key(load_predictions(None))) == {}


def test_a_table_without_held_out_rows_says_why(home):
    # teacher outputs on the train split of a table without inputs: not held out
    table = state.validate_upload("mine.csv", state.example_csv("train"))
    at = _page()
    at.session_state[state.UPLOADS] = {"mine.csv (uploaded)": table}
    at.session_state[state.UPLOAD_TOKENS] = {"mine.csv (uploaded)": "t1"}
    at.run()
    at.selectbox(key="bias_source").set_value("mine.csv (uploaded)").run()
    assert not at.exception and not at.error
    assert any("not assessed" in i.value for i in at.info)
