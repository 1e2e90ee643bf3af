"""The training loop, jobs and compare on the bundled sample, with tiny configs."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from kdcore.analysis.metrics import bias_inheritance, paired_difference
from kdcore.data.bundles import load_bundle
from kdcore.errors import DataError
from kdcore.learning.train import TrainConfig, train_student
from kdcore.store.jobs import cancel_job, execute_run, start_job
from kdcore.store.runs import Run, RunStore
from kdcore.value.compare import plan, run_all, summarise

STRATEGIES = ["ce", "kd", "dkd", "kd+be", "kd+br", "kd+be+br", "kd+be+br+dl", "dkd+be+br+dl",
              "btkd"]


@pytest.fixture(scope="module")
def bundle():
    return load_bundle()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_a_few_epochs(bundle, strategy):
    config = TrainConfig.for_bundle(bundle, strategy=strategy, epochs=2)
    _, result, metrics = train_student(config, bundle)
    assert len(result.history) == 2
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert set(metrics["per_class_accuracy"]) == set(bundle.class_names)
    assert metrics["student_params"] < metrics["teacher_params"]


def test_training_is_deterministic_for_a_seed(bundle):
    config = TrainConfig.for_bundle(bundle, strategy="kd+be+br+dl", epochs=2, seed=3)
    a = train_student(config, bundle)[1].test_logits
    b = train_student(config, bundle)[1].test_logits
    assert np.array_equal(a, b)


def test_every_strategy_takes_the_same_number_of_steps(bundle):
    steps = {}
    for strategy in ("ce", "kd+be+br+dl"):
        seen = []
        config = TrainConfig.for_bundle(bundle, strategy=strategy, epochs=1)
        train_student(config, bundle, on_progress=lambda s, total, m, seen=seen: seen.append(total))
        steps[strategy] = seen[-1]
    assert steps["ce"] == steps["kd+be+br+dl"] > 1


def test_btkd_config_uses_subset_normalisation(bundle):
    assert TrainConfig.for_bundle(bundle, strategy="btkd").normalisation == "subset"


def test_a_method_owns_its_options_and_their_defaults_are_not_stored(bundle):
    dkd = TrainConfig.for_bundle(bundle, strategy="dkd+be")
    kd = TrainConfig.for_bundle(bundle, strategy="kd")
    assert dkd.method_options == {"alpha": 1.0, "beta": 8.0, "warmup": 20}
    assert kd.method_options == {}
    # the same stored settings but the strategy: kd and dkd runs compare with each other
    assert {**dkd.to_dict(), "strategy": "kd"} == kd.to_dict()
    assert not any(key.startswith("dkd") or key == "method_options" for key in kd.to_dict())
    custom = TrainConfig.for_bundle(bundle, strategy="dkd", method_options={"beta": 2.0})
    assert custom.to_dict()["method_options"] == {"alpha": 1.0, "beta": 2.0, "warmup": 20}
    assert TrainConfig(**custom.to_dict()) == custom


@pytest.mark.parametrize(("strategy", "message"), [
    ("kd", "kd has no option beta"), ("ce", "takes no method options, not beta")])
def test_options_a_method_does_not_have_are_data_errors(bundle, strategy, message):
    with pytest.raises(DataError, match=message):
        TrainConfig.for_bundle(bundle, strategy=strategy, method_options={"beta": 2.0})


def test_the_method_options_reach_the_training(bundle):
    def logits(**options):
        config = TrainConfig.for_bundle(bundle, strategy="dkd", epochs=1, method_options=options)
        return train_student(config, bundle)[1].test_logits

    assert np.array_equal(logits(), logits(alpha=1.0, beta=8.0, warmup=20))
    assert not np.array_equal(logits(), logits(warmup=0))


def test_bias_inheritance_counts_same_wrong_class_only():
    labels = np.array([0, 0, 1, 1, 2])
    teacher = np.array([1, 2, 1, 0, 2])  # wrong on rows 0, 1, 3
    student = np.array([1, 0, 1, 2, 2])  # copies row 0 only
    assert bias_inheritance(student, teacher, labels) == pytest.approx(1 / 3)


def test_execute_run_records_epochs_metrics_and_artifacts(bundle, workspace):
    store = RunStore(workspace)
    run_id = store.create(TrainConfig.for_bundle(bundle, strategy="kd", epochs=3).to_dict())
    metrics = execute_run(run_id, workspace=workspace)
    run = store.get(run_id)
    assert run.status == "done"
    assert run.metrics["test_accuracy"] == metrics["test_accuracy"]
    assert list(store.epochs(run_id)["epoch"]) == [0, 1, 2]
    artifacts = store.artifact_dir(run_id)
    with np.load(artifacts / "test_predictions.npz") as preds:
        assert preds["logits"].shape == (len(bundle.y("test")), bundle.n_classes)
    import torch

    state = torch.load(artifacts / "student.pt", weights_only=True)
    assert any(k.endswith("weight") for k in state)


def test_compare_reuses_finished_identical_runs(bundle, workspace):
    store = RunStore(workspace)
    configs = plan(bundle, ["ce", "kd"], range(2), epochs=2)
    first = run_all(store, configs, workers=1)
    reused = []
    second = run_all(store, configs, workers=1, on_done=lambda run, r: reused.append(r))
    assert [r.id for r in first] == [r.id for r in second]
    assert reused == [True] * 4
    assert len(store.list()) == 4


def test_summary_pairs_seeds_against_kd(bundle, workspace):
    store = RunStore(workspace)
    runs = run_all(store, plan(bundle, ["kd", "kd+be+br"], range(2), epochs=2), workers=2)
    summary = summarise(runs)
    entry = summary["strategies"]["kd+be+br"]
    per_kd = summary["strategies"]["kd"]["per_seed"]
    expected = np.mean(entry["per_seed"]) - np.mean(per_kd)
    assert entry["delta_vs_kd"]["mean"] == pytest.approx(expected)
    assert len(entry["delta_vs_kd"]["ci95"]) == 2
    assert summary["verdict"].endswith(".")


def test_paired_difference_interval_matches_t_distribution():
    out = paired_difference([0.92, 0.93, 0.94], [0.90, 0.90, 0.90])
    # diffs 0.02, 0.03, 0.04: mean 0.03, sd 0.01, t(0.975, 2) = 4.303
    assert out["mean"] == pytest.approx(0.03)
    assert out["ci95"] == pytest.approx([0.03 - 4.3027 * 0.01 / 3**0.5,
                                         0.03 + 4.3027 * 0.01 / 3**0.5], abs=1e-4)


def _verdict(diffs):
    """The verdict on kd and kd+be+br+dl runs whose per-seed differences are ``diffs``."""
    kd = [0.90, 0.91, 0.92, 0.905]
    runs = [Run(id=f"{name}{seed}", status="done", strategy=name, seed=seed, bundle=None,
                config={}, error=None, created_at="", started_at=None, finished_at=None,
                pid=None, host=None, step=0, total_steps=None, message="",
                metrics={"test_accuracy": acc, "best_test_accuracy": acc,
                         "bias_inheritance": 0.3, "teacher_test_accuracy": 0.9})
            for name, accs in (("kd", kd), ("kd+be+br+dl", np.add(kd, diffs)))
            for seed, acc in enumerate(accs)]
    return summarise(runs)["verdict"]


def test_verdict_says_when_bias_aware_distillation_does_not_pay():
    assert "does not pay" in _verdict([-0.03, -0.01, -0.02, -0.025])
    assert "cannot be told apart from vanilla KD" in _verdict([-0.01, 0.02, 0.0, 0.01])
    assert "beats vanilla KD" in _verdict([0.01, 0.03, 0.02, 0.015])


def test_a_detached_job_can_be_cancelled(bundle, workspace):
    config = TrainConfig.for_bundle(bundle, strategy="kd", epochs=5000)
    run_id = start_job(config, workspace=workspace)
    store = RunStore(workspace)
    deadline = time.time() + 60
    while store.get(run_id).status != "running" and time.time() < deadline:
        time.sleep(0.2)
    assert store.get(run_id).status == "running"
    cancel_job(run_id, workspace=workspace)
    deadline = time.time() + 15
    while store.get(run_id).status == "running" and time.time() < deadline:
        time.sleep(0.2)
    assert store.get(run_id).status == "cancelled"


def _cli(*args, workspace):
    command = [sys.executable, "-m", "kdcore", *args, "--workspace", str(workspace)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_cli_train_json_has_the_documented_keys(workspace):
    out = _cli("train", "--strategy", "kd+be+br+dl", "--epochs", "2", "--json", workspace=workspace)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    for key in ("run_id", "strategy", "seed", "test_accuracy", "best_test_accuracy",
                "per_class_accuracy", "bias_inheritance", "teacher_test_accuracy", "world_size"):
        assert key in doc
    assert doc["world_size"] == 1


def test_cli_compare_json_has_the_documented_keys(workspace):
    out = _cli("compare", "--strategies", "kd,kd+be+br", "--seeds", "2", "--epochs", "2",
               "--json", workspace=workspace)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert "teacher_test_accuracy" in doc
    entry = doc["strategies"]["kd+be+br"]
    for key in ("mean", "std", "seeds", "per_seed", "bias_inheritance", "delta_vs_kd",
                "delta_vs_ce", "delta_vs_teacher", "excess_inheritance", "per_class",
                "error_map"):
        assert key in entry
    assert set(entry["delta_vs_kd"]) == {"mean", "ci95"}
    assert set(entry["delta_vs_teacher"]) == {"mean", "ci95"}
    assert entry["delta_vs_ce"] is None and entry["excess_inheritance"] is None  # no ce here
    assert set(entry["error_map"]) == {"both_wrong", "fixed", "newly_wrong"}
    assert set(doc["calibration"]) == {"teacher", "strategies"}
    assert set(doc["calibration"]["strategies"]["kd"]) == {"ece", "nll", "brier"}
    assert doc["decision"]["distil"] is None and doc["decision"]["delta_vs_ce"] is None
    assert doc["verdict"].startswith("Cannot tell:")


def test_cli_bad_strategy_exits_2_with_one_line(workspace):
    out = _cli("train", "--strategy", "kd+zz", workspace=workspace)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "kd+zz" in out.stderr
    assert not RunStore(workspace).list()


def test_cli_runs_show_and_rm(workspace):
    out = _cli("train", "--strategy", "ce", "--epochs", "1", "--json", workspace=workspace)
    run_id = json.loads(out.stdout)["run_id"]
    shown = json.loads(_cli("runs", "show", run_id, "--json", workspace=workspace).stdout)
    assert shown["id"] == run_id and shown["status"] == "done"
    assert _cli("runs", "rm", run_id, workspace=workspace).returncode == 0
    assert _cli("runs", "show", run_id, workspace=workspace).returncode == 2


def test_two_process_ddp_run_matches_one_process(workspace):
    args = ("train", "--strategy", "kd+be+br+dl", "--epochs", "3", "--json", "--quiet")
    single = _cli(*args, workspace=workspace)
    double = _cli(*args, "--nproc", "2", workspace=workspace)
    assert single.returncode == 0 and double.returncode == 0, double.stderr
    one, two = json.loads(single.stdout), json.loads(double.stdout)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert abs(one["test_accuracy"] - two["test_accuracy"]) <= 0.01
    assert RunStore(workspace).get(two["run_id"]).status == "done"


def test_amp_on_cpu_is_a_one_line_error(workspace):
    out = _cli("train", "--strategy", "kd", "--epochs", "1", "--amp", workspace=workspace)
    assert out.returncode == 2 and "--amp needs a CUDA device" in out.stderr
