"""A damaged file in the workspace breaks nothing else (issue 13, item 8): a corrupt label
overrides file is one line naming it and the fix, where overrides are used; one unreadable run
row shows as unreadable, in the CLI and on every page, and is never reused."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from kdcore.data.bundles import load_bundle
from kdcore.learning.train import TrainConfig
from kdcore.store.overrides import FILE_NAME, attach
from kdcore.store.runs import RunStore
from kdcore.value.compare import plan, run_all

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"


def _kdcore(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcore", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def _one_line(out: subprocess.CompletedProcess) -> str:
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and "internal failure" not in out.stderr
    return out.stderr


def _page(page: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=90)
    at.switch_page(page)
    return at.run()


@pytest.fixture
def corrupt_overrides(tmp_path, monkeypatch) -> Path:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / FILE_NAME).write_bytes(b"this is not a SQLite database\n" * 200)
    monkeypatch.setenv("KDCORE_HOME", str(workspace))
    return workspace


def test_a_corrupt_overrides_file_is_one_line_with_the_fix(corrupt_overrides):
    bad = corrupt_overrides / FILE_NAME
    for args in (["analyze"],
                 ["train", "--strategy", "kd+be+lq", "--epochs", "1", "--quiet"],
                 ["compare", "--strategies", "kd,kd+be+lq", "--seeds", "1", "--epochs", "1",
                  "--quiet"]):
        out = _kdcore(*args, "--workspace", corrupt_overrides)
        assert out.returncode == 2, (args, out.stderr)
        message = _one_line(out)
        assert str(bad) in message and "move the file away" in message
    assert RunStore(corrupt_overrides).list() == []  # nothing half-written, not even kd's run
    # what does not use overrides goes on as if the file were fine
    assert _kdcore("runs", "--workspace", corrupt_overrides).returncode == 0
    plain = attach(TrainConfig.for_bundle(load_bundle(), strategy="kd+be+br+dl"),
                   corrupt_overrides)
    assert "label_overrides" not in plain.to_dict()


def test_the_teacher_bias_page_draws_its_charts_beside_a_corrupt_overrides_file(
        corrupt_overrides):
    at = _page("app_pages/teacher_bias.py")
    assert not at.exception
    assert len(at.get("plotly_chart")) >= 4

    def said() -> bool:
        return any(FILE_NAME in e.value and "move the file away" in e.value for e in at.error)

    deadline = time.monotonic() + 180  # overrides apply to the verdicts, which a task computes
    while not said() and time.monotonic() < deadline:
        time.sleep(0.5)
        at.run()
    assert not at.exception
    assert said()
    assert len(at.get("plotly_chart")) >= 4


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, list]:
    """kd and ce, trained for one epoch; then ce's metrics and one of kd's epochs damaged."""
    workspace = tmp_path_factory.mktemp("damaged")
    configs = plan(load_bundle(None), ["kd", "ce"], [0], epochs=1)
    good, bad = run_all(RunStore(workspace), configs, workers=1)
    with closing(sqlite3.connect(workspace / "runs.sqlite")) as conn, conn:
        conn.execute("UPDATE runs SET metrics = substr(metrics, 1, 20) WHERE id = ?", (bad.id,))
        conn.execute("UPDATE epochs SET metrics = '{\"loss\": ' WHERE run_id = ?", (good.id,))
    return workspace, [good, bad], configs


def test_one_bad_metrics_row_shows_as_unreadable_and_is_never_reused(two_runs):
    workspace, (good, bad), configs = two_runs
    out = _kdcore("runs", "--workspace", workspace)
    assert out.returncode == 0, out.stderr
    assert good.id in out.stdout and f"run {bad.id}: unreadable run record" in out.stdout
    out = _kdcore("runs", "--json", "--workspace", workspace)
    assert out.returncode == 0, out.stderr
    rows = {r["id"]: r for r in json.loads(out.stdout)["runs"]}
    assert rows[good.id]["status"] == "done"
    assert rows[bad.id]["status"] == "failed" and "not valid JSON" in rows[bad.id]["error"]
    for run in (good, bad):
        out = _kdcore("runs", "show", run.id, "--workspace", workspace)
        assert out.returncode == 0, out.stderr
    store = RunStore(workspace)
    assert store.get(bad.id).unreadable and not store.get(good.id).unreadable
    assert store.epochs(good.id).empty  # its only epoch was the damaged one
    assert [r.id for r in store.list(status="done")] == [good.id]
    assert store.find_done(configs[1].to_dict()) is None  # ce is trained again, not reused


@pytest.mark.parametrize("page", ["app_pages/overview.py", "app_pages/results.py",
                                  "app_pages/train.py", "app_pages/roi.py"])
def test_every_page_opens_beside_a_bad_metrics_row(two_runs, monkeypatch, page):
    monkeypatch.setenv("KDCORE_HOME", str(two_runs[0]))
    at = _page(page)
    assert not at.exception, page
    texts = [e.value for kind in ("markdown", "error", "warning") for e in at.get(kind)]
    if page.endswith("train.py"):  # the list of recent runs says which one is damaged
        assert any(f"{two_runs[1][1].id}`) failed: unreadable run record" in t for t in texts)
    else:  # the good run is drawn
        assert at.get("plotly_chart")
