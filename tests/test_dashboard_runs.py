"""The Train and Results pages: they render empty and full, start real jobs and cancel them."""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from kdcore.data.bundles import load_bundle
from kdcore.learning.train import TrainConfig
from kdcore.store.jobs import cancel_job, start_job
from kdcore.store.runs import Run, RunStore
from kdcore.value.compare import plan, run_all

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
TRAIN, RESULTS = "app_pages/train.py", "app_pages/results.py"
FIXTURE_STRATEGIES = ["ce", "kd", "kd+be+br+dl"]
JOB_START_S = 120  # a job process starts in seconds; far more on a busy CI machine


def open_page(page: str) -> AppTest:
    """The page as the app's router shows it."""
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.switch_page(page)
    return at.run()


def wait_for(store: RunStore, run_id: str, done: Callable[[Run], bool], seconds: float) -> Run:
    deadline = time.monotonic() + seconds
    while True:
        run = store.get(run_id)
        if done(run) or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


@pytest.fixture(scope="module")
def finished_workspace(tmp_path_factory) -> Path:
    """A workspace with ce, kd and kd+be+br+dl trained for 2 epochs on seeds 0 and 1."""
    workspace = tmp_path_factory.mktemp("finished")
    configs = plan(load_bundle(None), FIXTURE_STRATEGIES, range(2), epochs=2)
    run_all(RunStore(workspace), configs, workers=1)
    return workspace


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def finished_home(finished_workspace, monkeypatch) -> Path:
    monkeypatch.setenv("KDCORE_HOME", str(finished_workspace))
    return finished_workspace


@pytest.fixture
def copied_home(finished_workspace, tmp_path, monkeypatch) -> Path:
    """A private copy of the finished runs, for a test that adds runs of its own.

    The database is copied with SQLite's backup API, never as a file: closing any descriptor
    of a SQLite file drops all of this process's locks on it, under its open connections.
    """
    workspace = tmp_path / "copy"
    shutil.copytree(finished_workspace / "runs", workspace / "runs")
    with closing(sqlite3.connect(finished_workspace / "runs.sqlite")) as source, \
            closing(sqlite3.connect(workspace / "runs.sqlite")) as target:
        source.backup(target)
    monkeypatch.setenv("KDCORE_HOME", str(workspace))
    return workspace


def test_results_page_with_an_empty_store_points_to_the_demo(empty_home):
    at = open_page(RESULTS)
    assert not at.exception
    assert any("Run the demo" in info.value and "kdcore demo" in info.value for info in at.info)
    assert not at.error


def test_train_page_with_an_empty_store_prefills_the_bundle_defaults(empty_home):
    at = open_page(TRAIN)
    assert not at.exception and not at.error
    defaults = load_bundle(None).training_defaults
    assert at.number_input(key="train_epochs").value == defaults["epochs"]
    assert at.multiselect(key="train_strategies").value == [
        "ce", "kd", "kd+be", "kd+be+br", "kd+be+br+dl"]
    assert any("15 runs" in md.value for md in at.markdown)
    assert not at.button(key="train_start").disabled


def test_train_page_explains_an_unknown_strategy_instead_of_starting(empty_home):
    at = open_page(TRAIN)
    at.multiselect(key="train_strategies").set_value(["kd", "kd+xx"]).run()
    assert not at.exception
    assert any("kd+xx" in error.value for error in at.error)
    assert "train_start" not in {button.key for button in at.button}


def test_results_page_compares_finished_runs(finished_home):
    at = open_page(RESULTS)
    assert not at.exception and not at.error
    verdict = at.info[0].value
    assert "kd+be+br+dl" in verdict and "vanilla KD" in verdict
    labels = [metric.label for metric in at.metric]
    assert "Teacher test accuracy" in labels and "Vanilla KD" in labels
    assert at.selectbox(key="results_settings").value.startswith("digits_vendor · 2 epochs")
    assert set(at.multiselect(key="results_curve_strategies").value) == set(FIXTURE_STRATEGIES)
    runs_table = at.dataframe[-1].value  # the run table closes the page
    assert len(runs_table) == len(RunStore(finished_home).list())

    at.multiselect(key="results_filter_strategy").set_value(["kd"]).run()
    assert not at.exception
    assert set(at.dataframe[-1].value["strategy"]) == {"kd"}

    at.radio(key="results_curve_mode").set_value("Each seed").run()
    at.multiselect(key="results_class_strategies").set_value(["ce", "kd"]).run()
    assert not at.exception and not at.error


def test_results_page_never_mixes_runs_trained_with_different_settings(copied_home):
    store = RunStore(copied_home)
    kd = store.list(strategy="kd", status="done")[0]
    odd = store.create({**kd.config, "epochs": 3})
    store.start(odd)
    store.finish(odd, {**kd.metrics, "test_accuracy": 0.1})
    shutil.copy(store.artifact_dir(kd.id) / "test_predictions.npz", store.artifact_dir(odd))

    at = open_page(RESULTS)
    assert not at.exception and not at.error
    choices = at.selectbox(key="results_settings")
    assert len(choices.options) == 2 and choices.value.startswith("digits_vendor · 2 epochs")
    table = at.dataframe[0].value.set_index("strategy")
    assert table.loc["kd", "accuracy"] > 10  # the 3-epoch run is not averaged in

    choices.set_value("digits_vendor · 3 epochs · T=4 · λ=0.5 · lr=0.003").run()
    assert not at.exception and not at.error
    assert at.multiselect(key="results_class_strategies").value == ["kd"]
    assert at.dataframe[0].value["accuracy"].tolist() == pytest.approx([10.0])


def test_train_page_lists_finished_runs_and_reuses_identical_ones(copied_home):
    store = RunStore(copied_home)
    failed = store.create({**store.list(strategy="ce")[0].config, "seed": 99})
    store.fail(failed, "interrupted: the training process exited without finishing (pid 1)")
    at = open_page(TRAIN)
    assert not at.exception
    assert [error.value for error in at.error] == [
        f"ce seed 99 (`{failed}`) failed: interrupted: the training process exited without "
        f"finishing (pid 1). Start it again above; its log is "
        f"{store.runs_dir / failed / 'job.log'}."]
    at.multiselect(key="train_strategies").set_value(["kd"])
    at.number_input(key="train_seeds").set_value(2)
    at.number_input(key="train_epochs").set_value(2).run()
    assert not at.exception
    assert any("0 to train" in md.value and "2 already finished" in md.value
               for md in at.markdown)
    assert at.button(key="train_start").disabled
    assert len(at.dataframe[-1].value) > 0


def test_start_training_launches_a_job_that_finishes(finished_home):
    store = RunStore(finished_home)
    before = {run.id for run in store.list()}
    at = open_page(TRAIN)
    at.multiselect(key="train_strategies").set_value(["kd+be"])
    at.number_input(key="train_seeds").set_value(1)
    at.number_input(key="train_epochs").set_value(2).run()
    assert any("1 to train" in md.value for md in at.markdown)

    at.button(key="train_start").click().run()
    assert not at.exception and not at.error
    assert any("Queued 1 run" in s.value for s in at.success)
    assert at.button(key="train_start").disabled  # the same run is never started twice
    new = [run for run in store.list() if run.id not in before]
    assert [(run.strategy, run.seed, run.config["epochs"]) for run in new] == [("kd+be", 0, 2)]

    run = wait_for(store, new[0].id, lambda r: r.finished, JOB_START_S + 60)
    assert run.status == "done", run.error
    assert 0 < run.metrics["test_accuracy"] <= 1
    assert len(store.epochs(run.id)) == 2


def test_cancel_button_stops_a_running_job(finished_home):
    store = RunStore(finished_home)
    config = TrainConfig.for_bundle(load_bundle(None), strategy="kd", seed=7, epochs=5000)
    run_id = start_job(config, workspace=finished_home)
    try:
        running = wait_for(store, run_id, lambda r: r.status == "running" or r.finished,
                           JOB_START_S)
        assert running.status == "running", running.error

        at = open_page(TRAIN)
        assert not at.exception
        assert any(run_id in md.value for md in at.markdown)
        at.button(key=f"train_cancel_{run_id}").click().run()
        assert not at.exception and not at.error

        run = wait_for(store, run_id, lambda r: r.finished, 15)
        assert run.status == "cancelled"
        at.run()
        assert f"train_cancel_{run_id}" not in {b.key for b in at.button}
    finally:
        if not store.get(run_id).finished:
            cancel_job(run_id, workspace=finished_home)
