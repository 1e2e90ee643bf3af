"""The recipe search (`kdcore recommend`): candidates, successive halving, reuse, storage, pages."""

from __future__ import annotations

import html
import io
import json
import os
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from kdcore.analysis.decision import best_of
from kdcore.cli import main
from kdcore.data.bundles import load_bundle
from kdcore.errors import DataError
from kdcore.store.runs import RunStore
from kdcore.store.tasks import task_status
from kdcore.value import recommend as rec
from kdcore.value.recommend import (
    DEFAULT_CANDIDATES,
    holm_intervals,
    latest_recommendation,
    parse_candidate,
    parse_candidates,
    plan_search,
    successive_halving,
)
from kdcore.value.report import build_report, render_html

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
KEYS = {"recommended", "ranking", "runs_used", "full_grid_runs"}


def table_evaluator(means: dict[str, float], noise: float = 0.004, seed: int = 0):
    """A fake trainer: accuracy = the candidate's mean plus a fixed per-(candidate, seed)
    noise; records every (candidate, seed) it was asked for."""
    rng = np.random.default_rng(seed)
    draws = {(n, s): float(m + rng.normal(0, noise)) for n, m in means.items() for s in range(5)}
    asked: list[tuple[str, int]] = []

    def evaluate(pairs):
        asked.extend(pairs)
        return {p: draws[p] for p in pairs}

    evaluate.draws = draws
    return evaluate, asked


# ---------------------------------------------------------------- candidates


def test_candidate_syntax_sets_options_and_names_the_recipe():
    c = parse_candidate("KD+be+br+dl@T=8@lam=0.3")
    assert (c.label, c.strategy) == ("kd+be+br+dl@T=8@lam=0.3", "kd+be+br+dl")
    assert c.settings == {"temperature": 8.0, "lam": 0.3} and c.method_options == {}
    dkd = parse_candidate("dkd@beta=4@warmup=5")
    assert dkd.method_options == {"beta": 4.0, "warmup": 5}
    assert parse_candidate("btkd").strategy == "btkd"
    assert [c.label for c in parse_candidates(["ce,kd", "kd@T=2"])] == ["ce", "kd", "kd@T=2"]
    assert len(parse_candidates(None)) == 12 == len(DEFAULT_CANDIDATES)


@pytest.mark.parametrize("text, says", [
    ("kd@T", "is not KEY=VALUE"),
    ("kd@T=abc", "T=abc needs a number"),
    ("kd@epochs=2.5", "needs a whole number"),
    ("kd@T=0", "out of range"),
    ("kd@T=2@T=3", "given twice"),
    ("xx@T=2", "unknown base loss"),
])
def test_bad_candidate_is_one_line_naming_it(text, says):
    with pytest.raises(DataError) as info:
        parse_candidate(text)
    message = str(info.value)
    assert f"candidate {text!r}" in message and says in message and "\n" not in message


def test_bad_candidate_on_the_command_line_exits_2_with_one_line(tmp_path, capsys):
    assert main(["recommend", "--candidates", "kd@alpha=1", "ce",
                 "--workspace", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "kd@alpha=1" in err and "no option alpha" in err


def test_the_plan_checks_the_budget_and_merges_identical_recipes(tmp_path):
    sample = load_bundle(None)
    search = plan_search(sample, ["kd", "kd@T=4", "ce"], workspace=tmp_path)  # T=4: the default
    assert [c.label for c in search.candidates] == ["kd", "ce"]
    assert search.duplicates == ("kd@T=4",)
    assert search.full_grid_runs == 10 and search.budget_runs == 5
    with pytest.raises(DataError, match="at least 4"):
        plan_search(sample, ["kd", "ce"], budget_runs=3, workspace=tmp_path)
    with pytest.raises(DataError, match="not both"):
        plan_search(sample, ["kd", "ce"], budget_runs=6, budget_minutes=1, workspace=tmp_path)


def test_the_default_search_covers_the_issues_twelve_recipes(tmp_path):
    try:
        search = plan_search(load_bundle(None), workspace=tmp_path)
    except DataError as exc:  # ls, dist and rld not in the strategy catalogue yet
        pytest.skip(str(exc))
    assert len(search.candidates) == 12
    assert (search.full_grid_runs, search.budget_runs) == (60, 30)


def test_the_dashboards_command_line_names_the_same_search(tmp_path):
    sample = load_bundle(None)
    search = plan_search(sample, ["ce", "kd@T=2"], workspace=tmp_path, budget_runs=6)
    argv = search.argv()
    again = plan_search(sample, argv[argv.index("--candidates") + 1:argv.index("--seeds-max")],
                        workspace=tmp_path, budget_runs=int(argv[argv.index("--budget-runs") + 1]))
    assert again.result_path == search.result_path


# ---------------------------------------------------------------- the search


def test_holm_intervals_agree_with_the_decisions_best_of():
    acc = {"kd": {0: .90, 1: .91, 2: .905}, "a": {0: .93, 1: .95, 2: .94},
           "b": {0: .92, 1: .91, 2: .925}, "c": {0: .89, 1: .90, 2: .91}}
    ours = holm_intervals({n: [acc[n][s] - acc["kd"][s] for s in range(3)]
                           for n in ("a", "b", "c")})
    theirs = best_of(acc, ["a", "b", "c"], "kd")
    assert theirs["best"] == "a"
    assert ours["a"]["ci95"] == pytest.approx(theirs["delta"]["ci95"])
    assert ours["a"]["level"] == pytest.approx(theirs["level"])
    assert ours["a"]["p_adjusted"] == pytest.approx(theirs["p_adjusted"])


def test_a_clearly_best_candidate_is_found_with_fewer_runs_than_the_grid():
    means = {"best": 0.95, **{f"c{i}": 0.80 for i in range(5)}}
    evaluate, asked = table_evaluator(means)
    found = successive_halving(list(means), evaluate, seeds_max=5)
    assert found["leader"] == "best" and found["stopped"] == "separated"
    assert set(found["dropped"]) == set(means) - {"best"}
    assert found["runs_used"] == len(asked) == len(set(asked)) < len(means) * 5
    assert all(d["vs_leader"]["ci95"][1] < 0 for d in found["dropped"].values())


def test_a_tie_stops_at_the_budget():
    means = {f"c{i}": 0.90 for i in range(4)}
    evaluate, asked = table_evaluator(means, noise=0.01)
    found = successive_halving(list(means), evaluate, seeds_max=5, budget_runs=11)
    assert found["stopped"] == "budget" and found["runs_used"] == len(asked) == 11
    assert not found["dropped"]
    # the round the budget could not pay for in full gave its seeds to the highest means
    late = [name for name, seed in asked if seed == 2]
    by_mean = sorted(means, key=lambda n: -np.mean([evaluate.draws[(n, s)] for s in (0, 1)]))
    assert late == by_mean[:3]


def test_without_a_budget_a_tie_runs_every_seed_of_every_survivor():
    means = {f"c{i}": 0.90 for i in range(3)}
    evaluate, asked = table_evaluator(means, noise=0.01)
    found = successive_halving(list(means), evaluate, seeds_max=4)
    assert found["stopped"] == "seeds_max" and found["runs_used"] == 12 == len(set(asked))
    assert [r["seeds"] for r in found["rounds"]] == [2, 3, 4]


def test_a_time_budget_stops_adding_rounds():
    means = {f"c{i}": 0.90 for i in range(3)}
    evaluate, asked = table_evaluator(means, noise=0.01)
    now = [0.0]

    def timed(pairs):
        now[0] += 10.0 * len(pairs)  # 10 s a run
        return evaluate(pairs)

    found = successive_halving(list(means), timed, seeds_max=5, budget_seconds=80,
                               clock=lambda: now[0])
    # round 1: 6 runs, 60 s; 20 s left pays for 2 more runs, then the time is spent
    assert found["stopped"] == "budget" and found["runs_used"] == 8


# ---------------------------------------------------------------- on the sample


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A tiny real search on the sample (2 candidates, 1 epoch, 1 worker), run twice: the
    second time every run is reused."""
    workspace = tmp_path_factory.mktemp("recommend")
    argv = ["recommend", "--candidates", "ce", "kd@T=2", "--epochs", "1", "--budget-runs", "4",
            "--workers", "1", "--workspace", str(workspace), "--json", "--quiet"]
    docs = []
    for _ in range(2):
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(argv) == 0
        docs.append(json.loads(out.getvalue()))
    return workspace, docs[0], docs[1]


def test_recommend_on_the_sample_trains_then_reuses(searched):
    workspace, first, second = searched
    assert KEYS <= set(first)
    assert first["runs_used"] == 4 == first["runs_trained"] and first["runs_reused"] == 0
    assert second["runs_used"] == 4 == second["runs_reused"] and second["runs_trained"] == 0
    assert first["full_grid_runs"] == 10
    assert first["recommended"]["recipe"] == second["recommended"]["recipe"]
    assert {r["recipe"] for r in first["ranking"]} == {"ce", "kd@T=2"}
    assert all(r["seeds"] == 2 for r in first["ranking"])
    found = first["recommended"]
    assert found["mean"] == pytest.approx(np.mean(found["per_seed"]))
    assert found["delta_vs_kd"] is None and "kd was not a candidate" in " ".join(first["notes"])
    if found["recipe"] != "ce":
        assert found["delta_vs_ce"]["n_seeds"] == 2
    kept = latest_recommendation(workspace, load_bundle(None).path)
    assert kept["recommended"] == second["recommended"]
    assert not list((workspace / rec.RECOMMENDATIONS_DIR).rglob("*.progress"))


def test_the_report_shows_the_latest_recommendation(searched):
    workspace, _, doc = searched
    data = build_report(RunStore(workspace))
    assert data.recommendation == doc
    page = render_html(data)
    assert "Recipe search" in page and html.escape(doc["summary"]) in page


# ---------------------------------------------------------------- pages


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.switch_page(page)
    return at.run()


def test_overview_and_train_show_the_latest_recommendation(searched, monkeypatch):
    workspace, _, doc = searched  # the second search's result replaced the first's
    monkeypatch.setenv("KDCORE_HOME", str(workspace))
    at = open_page("app_pages/overview.py")
    assert not at.exception
    assert any("Recipe search" in i.value and doc["recommended"]["recipe"] in i.value
               for i in at.info)
    at = open_page("app_pages/train.py")
    assert not at.exception
    assert any(doc["summary"] == s.value for s in at.success)
    tables = [d.value for d in at.dataframe if "recipe" in d.value.columns]
    assert len(tables) == 1 and set(tables[0]["recipe"]) == {"ce", "kd@T=2"}


def test_find_the_best_recipe_starts_a_background_task(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path))
    started = []
    monkeypatch.setattr(rec, "start_task", lambda argv, **kw: started.append((argv, kw)))
    at = open_page("app_pages/train.py")
    if any("unknown base loss" in e.value for e in at.error):
        pytest.skip("the default candidates need ls, dist and rld")
    button = at.button(key="train_search_start")
    assert not button.disabled
    button.click().run()
    assert not at.exception
    argv, options = started[0]
    search = plan_search(load_bundle(None), workspace=tmp_path)  # the default search
    assert argv == search.argv() and options["output"] == search.result_path


def test_a_running_search_shows_its_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path))
    try:
        search = plan_search(load_bundle(None), workspace=tmp_path)
    except DataError as exc:
        pytest.skip(str(exc))
    task = rec.search_task(search)  # a task folder whose process is this one: "running"
    task.folder.mkdir(parents=True)
    (task.folder / "task.json").write_text(json.dumps({"started": 0}))
    (task.folder / "pid").write_text(str(os.getpid()))
    assert task_status(task).state == "running"
    rec._write_json(search.progress_path, {
        "round": 2, "round_runs": 10, "round_done": 3, "runs_used": 27, "runs_reused": 5,
        "budget_runs": 30, "full_grid_runs": 60, "survivors": ["btkd", "kd+be+br+dl@T=8"]})
    at = open_page("app_pages/train.py")
    assert not at.exception
    assert at.button(key="train_search_start").disabled
    assert any("kd+be+br+dl@T=8" in c.value for c in at.caption)
    assert any("27 of 30 runs used" in p.proto.text for p in at.get("progress"))
