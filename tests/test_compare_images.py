"""``kdcore compare`` on an image folder: one image run per strategy and seed, trained through
compare's pool, summarised and reported as bundle runs are."""

import json
import multiprocessing
import os
from pathlib import Path

import pytest
from test_image_train import make_images, save_teachers

from kdcore.cli import main
from kdcore.store.jobs import execute_run
from kdcore.store.runs import RunStore
from kdcore.value import compare

STRATEGIES = ["ce", "kd", "kd+be+br"]
RECORD = "KDCORE_TEST_LOADER_WORKERS"  # where _recording_execute_run notes what it was given


def _recording_execute_run(run_id: str, **options) -> dict:
    """execute_run, after noting the loader_workers it was given and how the training process
    would start its loader workers."""
    seen = [options.get("loader_workers"), multiprocessing.get_start_method()]
    (Path(os.environ[RECORD]) / run_id).write_text(json.dumps(seen))
    return execute_run(run_id, **options)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return make_images(root / "imgs"), save_teachers(root)["ts"]


def _compare(capsys, images, teacher, workspace, *extra) -> tuple[int, dict | None, str]:
    code = main(["compare", str(images), "--student", "resnet8", "--teacher-model", str(teacher),
                 "--strategies", ",".join(STRATEGIES), "--seeds", "2", "--epochs", "1",
                 "--batch-size", "40", "--workspace", str(workspace), "--json", "--quiet",
                 *extra])
    out = capsys.readouterr()
    return code, json.loads(out.out) if code == 0 else None, out.err


def test_compare_on_an_image_folder_summarises_and_reports_like_a_bundle(
        folder, tmp_path, capsys, monkeypatch):
    images, teacher = folder
    workspace, record = tmp_path / "ws", tmp_path / "record"
    record.mkdir()
    monkeypatch.setenv(RECORD, str(record))
    monkeypatch.setattr(compare, "execute_run", _recording_execute_run)

    code, doc, err = _compare(capsys, images, teacher, workspace, "--loader-workers", "1")
    assert code == 0, err
    assert list(doc["strategies"]) == STRATEGIES and doc["bundle"] == images.name
    assert doc["decision"]["best_strategy"] in STRATEGIES and doc["verdict"]
    assert doc["reused_runs"] == 0 and 0 <= doc["teacher_test_accuracy"] <= 1
    for name, entry in doc["strategies"].items():
        assert entry["seeds"] == [0, 1] and len(entry["per_class"]) == 10, name
        # from the saved test predictions: ce's run kept the teacher's test logits too
        assert entry["error_map"] is not None and doc["calibration"]["strategies"][name], name
    assert doc["strategies"]["kd"]["excess_inheritance"] is not None
    assert not doc["notes"] or "zero variance" in doc["notes"][0]

    run_ids = [i for entry in doc["strategies"].values() for i in entry["run_ids"]]
    # --loader-workers reached every training process (which starts them the platform's
    # default way, not by spawn as the pool started it), and is not part of what a run is
    default = multiprocessing.get_all_start_methods()[0]
    assert ({f.name: json.loads(f.read_text()) for f in record.iterdir()}
            == dict.fromkeys(run_ids, [1, default]))
    store = RunStore(workspace)
    for run_id in run_ids:
        config = store.get(run_id).config
        assert config["student_arch"] == "resnet8" and "loader_workers" not in config
    code, again, err = _compare(capsys, images, teacher, workspace)
    assert code == 0, err
    assert again["reused_runs"] == len(run_ids) and len(list(record.iterdir())) == len(run_ids)

    out = tmp_path / "report.html"
    code = main(["report", str(images), "--workspace", str(workspace), "--out", str(out),
                 "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert code == 0 and sorted(shown["runs"]) == sorted(run_ids)
    page = out.read_text(encoding="utf-8")
    assert f"kdcore report: {images.name}" in page and "Before and after" in page


def test_bad_image_compares_are_one_line_and_store_nothing(folder, tmp_path, capsys):
    images, teacher = folder
    workspace = tmp_path / "ws"
    code = main(["compare", str(images), "--student", "resnet8", "--strategies", "ce,kd",
                 "--seeds", "1", "--workspace", str(workspace), "--json", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "kd distils and needs a teacher" in err and len(err.splitlines()) == 1
    code = main(["compare", str(images), "--teacher-model", str(teacher), "--seeds", "1",
                 "--workspace", str(workspace), "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "--student" in err and len(err.splitlines()) == 1
    assert RunStore(workspace).list() == []
