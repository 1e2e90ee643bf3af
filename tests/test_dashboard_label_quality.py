"""AppTest checks of the Teacher bias page: charts first, the label check in a task process
(then the label-error split: bars, heatmap kind, overrides), clicks, and the page's formats."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from kdcore.analysis.analyzer import assess_table, select
from kdcore.analysis.bias import decompose
from kdcore.analysis.label_quality import LABEL_ERROR, TEACHER_BIAS, sample_keys
from kdcore.data.sources import load_predictions, source_key
from kdcore.data.tables import PredictionTable
from kdcore.store import tasks
from kdcore.store.label_checks import (
    LabelCheck,
    assessment,
    check_path,
    override_positions,
    read_verdicts,
    sample_key,
    write_label_check,
    write_table,
)
from kdcore.store.overrides import load_overrides
from kdcore.value import figures
from kdcore_app import state

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "dashboard" / "app_pages" / "teacher_bias.py"
TRUST = "Trust the label or the teacher?"
WAIT_S = 180  # the check's process imports scikit-learn and cleanlab: slow on a busy machine


def stop_label_checks(workspace: Path) -> None:
    """End the label checks the page started (their preparing threads, then their tasks):
    a test leaves no process behind."""
    for thread in threading.enumerate():
        if thread.name == "kdcore-label-check":
            thread.join(60)
    tasks.stop_tasks(workspace)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path / "ws"))
    yield tmp_path / "ws"
    stop_label_checks(tmp_path / "ws")


def _page() -> AppTest:
    return AppTest.from_file(str(PAGE), default_timeout=90)


def _charts(at: AppTest) -> str:
    return " ".join(c.proto.spec for c in at.get("plotly_chart"))


def _verdict_boxes(at: AppTest):
    return [s for s in at.selectbox if str(s.key or "").startswith("bias_verdict_")]


def _shown(at: AppTest) -> bool:
    return any(TRUST in m.value for m in at.markdown)


def _ready(at: AppTest) -> AppTest:
    """Rerun until the label check's verdicts are on the page (or it says why not)."""
    deadline = time.monotonic() + WAIT_S
    while not _shown(at) and not at.warning and time.monotonic() < deadline:
        time.sleep(0.5)
        at.run()
    assert not at.exception and not at.warning, (at.exception, at.warning)
    return at


def _the_task(home: Path) -> tasks.Task:
    deadline = time.monotonic() + 60  # the page starts it from a thread after its charts
    while time.monotonic() < deadline and not any(
            tasks._read_json(f).get("argv") for f in (home / tasks.TASKS_DIR).glob("*/task.json")):
        time.sleep(0.1)
    folders = list((home / tasks.TASKS_DIR).iterdir())
    assert len(folders) == 1, folders  # one check per source, started once
    spec = tasks._read_json(folders[0] / "task.json")
    assert spec["argv"][3] == "label-check"
    return tasks.Task(folders[0].name, folders[0], Path(spec["output"]))


@pytest.fixture
def streamlit_log():
    """Messages Streamlit logs (its widget and fragment warnings go to its own loggers)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    import streamlit.delta_generator  # noqa: F401  (their loggers exist once imported)
    import streamlit.elements.lib.policies  # noqa: F401

    handler = Keep()
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
               if n.startswith("streamlit")]
    for logger in loggers:
        logger.addHandler(handler)
    yield seen
    for logger in loggers:
        logger.removeHandler(handler)


# ---------------------------------------------------------------- charts first, check in a task


def test_charts_come_first_and_the_verdicts_follow_from_a_task(home):
    at = _page().run()
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) >= 5  # bias bars, heatmap, samples, pairs, confidence
    assert not _shown(at) and not _verdict_boxes(at)  # no verdicts yet, and no waiting
    assert any("Checking for label errors" in i.value for i in at.info)
    assert "likely label errors" not in _charts(at)

    task = _the_task(home)  # a kdcore process, not the server, does the check
    deadline = time.monotonic() + WAIT_S
    while tasks.task_status(task).state == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert tasks.task_status(task).state == "done", tasks.task_status(task)
    table = load_predictions(None)
    assert task.output == check_path(home, source_key(table))  # kept per source, by content

    at.run()
    if not _shown(at):  # the page may have been mid-way through rerunning itself
        at.run()
    assert _shown(at) and _verdict_boxes(at)
    assert "likely label errors" in _charts(at)
    assert not any("Checking for label errors" in i.value for i in at.info)


def test_the_stored_check_matches_the_check_on_every_split(tmp_path):
    """What the task stores, read back per split, is what checking that split gives; an
    upload written for the task reads back as the same table (same source key)."""
    rng = np.random.default_rng(1)
    n, k = 600, 4
    labels = rng.integers(0, k, n)
    logits = rng.standard_normal((n, k)).astype(np.float32)
    logits[np.arange(n), labels] += 2.0
    split = np.where(np.arange(n) % 3 == 0, "train", "test").astype(object)
    split[:30] = "unlabelled"
    labels[:30] = -1
    table = PredictionTable(source="t.csv", class_names=["a", "b", "c", "d"], outputs=logits,
                            kind="logits", labels=labels, split=split, sample_id=None,
                            extra=None)
    back = load_predictions(write_table(table, tmp_path / "t.parquet"))
    assert source_key(back) == source_key(table)
    write_label_check(back, tmp_path / "v.npz")
    stored = read_verdicts(tmp_path / "v.npz")
    for name in (None, "test", "train"):
        chosen = select(table, name)
        rows = np.flatnonzero(chosen.labels >= 0)
        got, want = assessment(stored, table, name, rows), assess_table(chosen)
        assert got.available == want.available and got.reason == want.reason
        assert np.array_equal(got.likely_label_error, want.likely_label_error)
        assert (got.method, got.note) == (want.method, want.note)
        assert got.likely_label_error.any() == (name != "train")  # train: not held out


def test_override_keys_map_to_the_rows_the_check_names(tmp_path):
    table = load_predictions(None)
    whole = assess_table(table)  # keys as analyze and +lq training name them
    chosen = select(table, "test")
    rows = np.flatnonzero(chosen.labels >= 0)
    keys = sample_keys(chosen.n_samples, "test")[rows]
    wrong = np.flatnonzero(chosen.outputs[rows].argmax(1) != chosen.labels[rows])[:3]
    overrides = {str(keys[i]): LABEL_ERROR for i in wrong} | {"train:0": TEACHER_BIAS,
                                                              "test:99999": LABEL_ERROR}
    positions, verdicts = override_positions(table, "test", rows, overrides)
    assert sorted(positions.tolist()) == sorted(wrong.tolist()) and set(verdicts) == {LABEL_ERROR}
    test_rows = np.flatnonzero(table.split == "test")
    assert [sample_key(table, int(test_rows[rows[i]])) for i in wrong] == [keys[i] for i in wrong]
    labelled = np.flatnonzero(table.labels >= 0)  # whole: labelled rows, in table order
    assert [sample_key(table, int(r)) for r in labelled[::37]] == list(whole.keys[::37])


def test_a_check_of_an_upload_writes_its_table_then_runs_once(tmp_path):
    table = state.validate_upload("mine.csv", state.example_csv("test"))
    check = LabelCheck(table, workspace=tmp_path)
    assert check.status(start=False).state == "running"  # not begun: the page draws first
    check.wait_prepared(60)
    assert check.output == check_path(tmp_path, source_key(table))
    assert check.output.with_suffix(".input.parquet").is_file()  # the upload, for the task
    deadline = time.monotonic() + WAIT_S
    while check.status().state == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert check.status().state == "done", check.status()
    again = LabelCheck(table, workspace=tmp_path)
    again.wait_prepared(60)
    assert again.task is None and again.status().state == "done"  # reused, not rerun


def test_a_running_check_can_be_stopped(home):
    _page().run()
    stop_label_checks(home)  # what the fixture does after every test
    task = _the_task(home)
    assert tasks.task_status(task).state in ("failed", "done")


# ---------------------------------------------------------------- the split, once checked


def test_split_bars_and_override_control_on_the_sample(home):
    at = _ready(_page().run())
    assert not at.exception and not at.error
    assert "likely label errors" in _charts(at)  # the stacked bars' second kind
    boxes = _verdict_boxes(at)
    assert boxes and boxes[0].value == "detected"
    for kind in ("label_error", "teacher_bias", "all"):
        at.segmented_control(key="bias_heatmap_kind").set_value(kind).run()
        assert not at.exception


def test_an_override_is_stored_and_shown(home, streamlit_log):
    at = _ready(_page().run())
    at.radio(key="bias_split").set_value("train").run()
    box = _verdict_boxes(at)[0]
    key = box.key
    box.set_value("label_error").run()
    assert not at.exception
    stored = load_overrides(home, source_key(load_predictions(None)))
    assert list(stored.values()) == ["label_error"] and key.endswith(next(iter(stored)))
    assert any("1 verdict is yours" in m.value for m in at.markdown)  # not "1 verdicts"
    at.selectbox(key=key).set_value("detected").run()
    assert load_overrides(home, source_key(load_predictions(None))) == {}
    assert not [m for m in streamlit_log if "callback" in m]  # the callback shows nothing


def test_a_table_without_held_out_rows_says_why(home):
    # teacher outputs on the train split of a table without inputs: not held out
    table = state.validate_upload("mine.csv", state.example_csv("train"))
    at = _page()
    at.session_state[state.UPLOADS] = {"mine.csv (uploaded)": table}
    at.session_state[state.UPLOAD_TOKENS] = {"mine.csv (uploaded)": "train-t1"}
    at.run()
    at.selectbox(key="bias_source").set_value("mine.csv (uploaded)").run()
    assert not at.exception and not at.error
    deadline = time.monotonic() + WAIT_S
    while not any("not assessed" in i.value for i in at.info) and time.monotonic() < deadline:
        time.sleep(0.5)
        at.run()
    assert any("not assessed" in i.value for i in at.info)


# ---------------------------------------------------------------- clicks and formats


def test_a_heatmap_click_sets_the_filter_and_clears_the_bars_selection(home, streamlit_log):
    at = _page().run()
    bars = next(c.proto.id for c in at.get("plotly_chart") if "bias_bars_" in c.proto.id)
    at.session_state["bias_heatmap_test"] = {"selection": {"points": [{"customdata": [3, 5]}]}}
    at.run()
    assert not at.exception
    assert (at.selectbox(key="bias_true").value, at.selectbox(key="bias_pred").value) == (3, 5)
    assert at.toggle(key="bias_only_wrong").value is True
    new_bars = next(c.proto.id for c in at.get("plotly_chart") if "bias_bars_" in c.proto.id)
    assert new_bars != bars  # a new widget: the class clicked before is no longer highlighted
    at.selectbox(key="bias_true").set_value(1).run()  # by hand: both selections go
    assert not any(c.proto.id.endswith("bias_heatmap_test") for c in at.get("plotly_chart"))
    warnings = [m for m in streamlit_log if "default value" in m or "fragment rerun" in m]
    assert not warnings


def _click(at: AppTest, chart: str, customdata: list[int]) -> AppTest:
    """A click on a point of the page's ``chart`` ("bars", "heatmap"), under its current key."""
    key = next(c.proto.id.rsplit("-", 1)[-1] for c in at.get("plotly_chart")
               if f"bias_{chart}_" in c.proto.id)
    at.session_state[key] = {"selection": {"points": [{"customdata": customdata}]}}
    return at.run()


def test_selections_while_and_after_the_check_log_no_streamlit_warning(home, streamlit_log):
    """Issue 19: after selections the server logged "A fragment rerun was triggered with a
    callback that displays elements" and "widget created with a default value but also had its
    value set via the Session State API". Clicks, the toggle, the kind and a verdict, first
    while the label check runs (the page's polling fragment is there), then with its verdicts."""
    at = _page().run()
    assert any("Checking for label errors" in i.value for i in at.info)
    _click(at, "bars", [4])
    _click(at, "heatmap", [7, 1])
    at.toggle(key="bias_normalise").set_value(True).run()
    assert (at.selectbox(key="bias_true").value, at.selectbox(key="bias_pred").value) == (7, 1)
    _ready(at)
    _click(at, "bars", [7])
    at.segmented_control(key="bias_heatmap_kind").set_value(TEACHER_BIAS).run()
    _click(at, "heatmap", [7, 1])
    _verdict_boxes(at)[0].set_value(LABEL_ERROR).run()
    at.toggle(key="bias_normalise").set_value(False).run()
    assert not at.exception and not at.error
    assert not [m for m in streamlit_log if "default value" in m or "fragment rerun" in m
                or "callback" in m]


def test_one_percent_format_readable_headers_and_dashes(home):
    at = _page().run()
    table = next(d for d in at.dataframe if "teacher accuracy" in d.value.columns)
    shown = pa.ipc.open_stream(table.proto.arrow_data.styler.display_values).read_all()
    shown = shown.to_pandas()
    assert "most_confused_with" not in table.value.columns and "None" not in shown.to_string()
    rep_rate = table.value["bias rate"].iloc[1]
    assert f"{100 * rep_rate:.1f}%" in shown.to_string()  # one decimal, as the metrics
    configs = {c.proto.id.rsplit("-", 1)[-1]: json.loads(c.proto.config or "{}")
               for c in at.get("plotly_chart")}  # Plotly's toolbar must not cover titles
    assert any(k.startswith("bias_probs_") for k in configs)
    assert all(v == {"displayModeBar": False} for v in configs.values()), configs
    pairs = next(d for d in at.dataframe if "share" in d.value.columns)
    assert '"format": "%.1f%%"' in pairs.proto.columns and pairs.value["share"].max() > 1


def test_count_axes_tick_whole_numbers():
    rng = np.random.default_rng(0)
    conf = np.zeros((4, 4), int)
    conf[0, 1], conf[2, 3] = 3, 1  # small counts: the colour bar must not repeat "1"
    heat = figures.error_confusion_heatmap(conf, list("abcd"))
    assert heat.data[0].colorbar.dtick == 1 and heat.data[0].colorbar.tickformat == ",d"
    labels = rng.integers(0, 3, 5)
    rep = decompose(labels, np.eye(3)[(labels + 1) % 3], class_names=list("xyz"))
    bars = figures.bias_rate_bars(rep.per_class)
    assert bars.layout.yaxis2.dtick == 1 and bars.layout.yaxis2.tickformat == ",d"
    assert figures.top_confusions_bar(rep.top_confusions).layout.xaxis.dtick == 1
    big = figures.error_confusion_heatmap(conf * 1000, list("abcd"))
    assert big.data[0].colorbar.dtick is None  # Plotly's own (whole) steps for large counts
