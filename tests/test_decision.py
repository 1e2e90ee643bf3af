"""Issue 16: the honest decision (distil or not, Holm for the best of N), per-class significance
(Benjamini-Hochberg), the error map and calibration. Constructed runs only: nothing is trained."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from kdcore.analysis.bias import softmax
from kdcore.analysis.calibration import calibration, reliability
from kdcore.analysis.decision import best_of, decide, holm, paired_p, per_class_deltas
from kdcore.analysis.metrics import bias_inheritance, error_map, paired_difference
from kdcore.errors import DataError
from kdcore.store import selection
from kdcore.store.runs import Run, RunStore
from kdcore.value.compare import summarise
from kdcore.value.predictions import load_test_predictions

CE_ACC = [0.90, 0.91, 0.92, 0.905, 0.915]
OPENINGS = ("Distil:", "Do not distil:", "Cannot tell:")


def _run(strategy: str, seed: int, accuracy: float, *, teacher: float = 0.89,
         per_class: dict | None = None, inheritance: float = 0.3) -> Run:
    """A finished run as the store returns it, with crafted metrics."""
    return Run(id=f"{strategy}-{seed}", status="done", strategy=strategy, seed=seed, bundle=None,
               config={"strategy": strategy, "seed": seed}, error=None, created_at="",
               started_at=None, finished_at=None, pid=None, host=None, step=0,
               total_steps=None, message="",
               metrics={"test_accuracy": accuracy, "best_test_accuracy": accuracy,
                        "bias_inheritance": inheritance, "teacher_test_accuracy": teacher,
                        "per_class_accuracy": per_class or {"a": accuracy, "b": accuracy}})


def _runs(accuracies: dict[str, list[float]], **kw) -> list[Run]:
    return [_run(name, seed, acc, **kw) for name, accs in accuracies.items()
            for seed, acc in enumerate(accs)]


def _offset(values: list[float], diffs: list[float]) -> list[float]:
    return [v + d for v, d in zip(values, diffs, strict=True)]


# --------------------------------------------------------------------------- question 1


def test_ce_wins_gives_do_not_distil():
    runs = _runs({"ce": CE_ACC,
                  "kd": _offset(CE_ACC, [-0.03, -0.04, -0.035, -0.045, -0.03]),
                  "kd+be+br": _offset(CE_ACC, [-0.02, -0.03, -0.01, -0.025, -0.015])})
    summary = summarise(runs)
    decision = summary["decision"]
    assert decision["distil"] is False
    assert decision["best_strategy"] == "ce" and decision["best_distilled"] == "kd+be+br"
    assert decision["adjustment"] == "holm, best of 2"
    assert decision["delta_vs_ce"]["mean"] == pytest.approx(-0.02)
    assert decision["delta_vs_ce"]["ci95"][1] < 0
    assert summary["verdict"].startswith("Do not distil:")
    assert "best of 2" in summary["verdict"].split(". ")[0]
    assert selection.best_student(runs) == "ce"  # ROI and the pages price the ce student


def test_a_clear_win_gives_distil_and_the_winner():
    runs = _runs({"ce": CE_ACC,
                  "kd": _offset(CE_ACC, [0.03, 0.04, 0.035, 0.045, 0.03]),
                  "kd+be+br+dl": _offset(CE_ACC, [0.05, 0.06, 0.055, 0.05, 0.065])})
    summary = summarise(runs)
    assert summary["decision"]["distil"] is True
    assert summary["decision"]["best_strategy"] == "kd+be+br+dl"
    assert summary["verdict"].startswith("Distil:")
    assert selection.best_student(runs) == "kd+be+br+dl"
    # The teacher (0.89) is below every kd+be+br+dl seed.
    assert summary["decision"]["beats_teacher"] is True


def test_identical_strategies_cannot_tell_and_have_no_interval():
    runs = _runs({"ce": CE_ACC, "kd": CE_ACC, "kd+be+br+dl": CE_ACC})
    summary = summarise(runs)
    assert summary["decision"]["distil"] is None
    assert summary["decision"]["delta_vs_ce"]["ci95"] is None
    assert summary["verdict"].startswith("Cannot tell:")


def test_the_same_gain_on_every_seed_is_not_a_win():
    """Issue 16 point 3: zero variance gives a zero-width interval that must not read as a win."""
    runs = _runs({"ce": CE_ACC, "kd": _offset(CE_ACC, [0.02] * 5)})
    summary = summarise(runs)
    assert summary["decision"]["distil"] is None
    assert summary["decision"]["delta_vs_ce"] == {"mean": pytest.approx(0.02), "ci95": None}
    assert summary["strategies"]["kd"]["delta_vs_ce"]["ci95"] is None
    assert summary["verdict"].startswith("Cannot tell:") and "zero variance" in summary["verdict"]


def test_fewer_than_two_seeds_cannot_tell():
    runs = _runs({"ce": [0.80], "kd": [0.95]})
    summary = summarise(runs)
    assert summary["decision"]["distil"] is None
    assert summary["decision"]["delta_vs_ce"]["ci95"] is None
    assert summary["decision"]["beats_teacher"] is None
    assert summary["verdict"].startswith("Cannot tell:")


def test_without_ce_the_first_answer_is_null_with_a_note():
    runs = _runs({"kd": [0.90, 0.91, 0.92], "kd+be": [0.93, 0.95, 0.94]})
    summary = summarise(runs)
    decision = summary["decision"]
    assert decision["distil"] is None and decision["delta_vs_ce"] is None
    assert "ce" in decision["note"] and decision["note"] in summary["notes"]
    assert decision["best_strategy"] == "kd+be"  # highest mean
    assert summary["strategies"]["kd+be"]["excess_inheritance"] is None
    assert summary["verdict"].startswith("Cannot tell: ce")


def test_holm_makes_the_best_of_n_claim_weaker():
    """A gain significant on its own (p = 0.025) is "cannot tell" as the best of 4."""
    gain = [0.01, 0.03, 0.02, 0.005, 0.035]
    assert 0.02 < paired_p(gain) < 0.05
    alone = {"ce": CE_ACC, "kd+be+br": _offset(CE_ACC, gain)}
    unadjusted = decide(dict_of(alone), 0.8)
    assert unadjusted["distil"] is True and unadjusted["adjustment"] == "holm, best of 1"
    assert unadjusted["delta_vs_ce"]["ci95"] == pytest.approx(
        paired_difference(alone["kd+be+br"], CE_ACC)["ci95"])
    tried = dict(alone, kd=_offset(CE_ACC, [-0.01, 0.01, 0.0, -0.005, 0.005]),
                 **{"kd+be": _offset(CE_ACC, [0.0, 0.01, -0.01, 0.0, 0.004]),
                    "kd+be+br+dl": _offset(CE_ACC, [0.01, -0.01, 0.0, 0.0, 0.0])})
    adjusted = decide(dict_of(tried), 0.8)
    assert adjusted["best_distilled"] == "kd+be+br" and adjusted["adjustment"] == "holm, best of 4"
    assert adjusted["distil"] is None
    assert adjusted["p_adjusted"] == pytest.approx(4 * paired_p(gain))  # smallest of the 4
    assert adjusted["ci_level"] == pytest.approx(1 - 0.05 / 4)
    low, high = adjusted["delta_vs_ce"]["ci95"]
    assert low < 0 < high  # wider than the unadjusted interval, which excludes 0
    verdict = summarise(_runs(tried))["verdict"]
    assert verdict.startswith("Cannot tell:") and "best of 4" in verdict


def dict_of(accuracies: dict[str, list[float]]) -> dict[str, dict[int, float]]:
    return {n: dict(enumerate(a)) for n, a in accuracies.items()}


def test_holm_adjusted_p_values_by_hand():
    # sorted 0.01, 0.03, 0.04: 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; max(0.06, 1 x 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = holm([0.01, math.nan])  # a NaN still counts in m and stays NaN
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1])


def test_best_of_the_bias_aware_variants_against_kd_is_in_the_verdict():
    runs = _runs({"ce": _offset(CE_ACC, [-0.1] * 5),
                  "kd": CE_ACC,
                  "kd+be": _offset(CE_ACC, [0.02, 0.03, 0.025, 0.02, 0.03]),
                  "kd+be+br": _offset(CE_ACC, [0.03, 0.04, 0.035, 0.03, 0.045])})
    summary = summarise(runs)
    found = summary["decision"]["bias_aware_vs_kd"]
    assert found["best"] == "kd+be+br" and found["n_variants"] == 2 and found["wins"] is True
    assert "beats vanilla KD" in summary["verdict"] and "best of 2" in summary["verdict"]
    assert best_of(dict_of({"kd": CE_ACC}), ["kd+be"], "kd") is None


def test_every_verdict_opens_with_one_of_three_answers():
    cases = [{"ce": CE_ACC}, {"kd": CE_ACC}, {"ce": CE_ACC[:1], "kd": CE_ACC[:1]},
             {"ce": CE_ACC, "kd": _offset(CE_ACC, [0.01, -0.02, 0.0, 0.01, -0.01])}]
    for case in cases:
        verdict = summarise(_runs(case))["verdict"]
        assert sum(verdict.startswith(o) for o in OPENINGS) == 1, verdict


# --------------------------------------------------------------------------- inheritance


def test_excess_inheritance_is_the_share_above_ces_floor():
    runs = (_runs({"ce": CE_ACC}, inheritance=0.2) + _runs({"kd": CE_ACC}, inheritance=0.45)
            + _runs({"kd+be+br": _offset(CE_ACC, [0.01] * 5)}, inheritance=0.3))
    summary = summarise(runs)
    assert summary["strategies"]["kd"]["excess_inheritance"] == pytest.approx(0.25)
    assert summary["strategies"]["kd+be+br"]["excess_inheritance"] == pytest.approx(0.1)
    assert summary["strategies"]["ce"]["excess_inheritance"] == pytest.approx(0.0)
    assert "excess inheritance of 10.0%" in summary["verdict"]
    assert "vanilla KD's 25.0%" in summary["verdict"]


# --------------------------------------------------------------------------- per class


def test_per_class_correction_equals_scipy_false_discovery_control():
    rng = np.random.default_rng(0)
    classes = [f"c{i}" for i in range(8)]
    a = {s: {c: float(rng.uniform(0.6, 1.0)) for c in classes} for s in range(5)}
    b = {s: {c: a[s][c] - float(rng.normal(0.02 * i, 0.03)) for i, c in enumerate(classes)}
         for s in range(5)}
    for s in range(5):  # c6: the same difference on every seed; c7: one seed only
        b[s]["c6"] = a[s]["c6"] - 0.05
        if s:
            a[s]["c7"] = None
    out = per_class_deltas(a, b)
    tested = classes[:6]
    raw = [stats.ttest_rel([a[s][c] for s in range(5)], [b[s][c] for s in range(5)]).pvalue
           for c in tested]
    assert [out[c]["p_value"] for c in tested] == pytest.approx(raw)
    assert [out[c]["p_adjusted"] for c in tested] == pytest.approx(
        list(stats.false_discovery_control(raw)))
    assert out["c6"]["p_adjusted"] is None and out["c6"]["delta"]["ci95"] is None
    assert out["c7"]["p_adjusted"] is None and out["c7"]["delta"]["ci95"] is None

    teacher = {c: 0.8 for c in classes}  # one number per class: a one-sample test
    against_teacher = per_class_deltas(a, teacher)
    raw = [stats.ttest_1samp([a[s][c] - 0.8 for s in range(5)], 0).pvalue for c in classes[:7]]
    assert [against_teacher[c]["p_adjusted"] for c in classes[:7]] == pytest.approx(
        list(stats.false_discovery_control(raw)))


def test_summary_lists_the_classes_distillation_hurts_and_fixes():
    seeds = range(5)
    noise = [0.0, 0.01, -0.01, 0.005, -0.005]
    runs = [_run("ce", s, 0.9, per_class={"a": 0.9 + noise[s], "b": 0.8 - noise[s], "c": 0.9})
            for s in seeds]
    runs += [_run("kd", s, 0.9, per_class={"a": 0.7 + 2 * noise[s], "b": 0.95 + noise[s],
                                            "c": 0.9 + noise[s]}) for s in seeds]
    summary = summarise(runs)
    classes = summary["classes"]
    assert classes["strategy"] == "kd" and classes["against"] == "ce"
    assert [c["class"] for c in classes["hurts"]] == ["a"]
    assert [c["class"] for c in classes["fixes"]] == ["b"]
    assert classes["hurts"][0]["delta"]["mean"] == pytest.approx(-0.2)
    row = summary["strategies"]["kd"]["per_class"][0]
    assert set(row) == {"class", "delta_vs_kd", "delta_vs_ce", "delta_vs_teacher",
                        "p_adjusted_vs_kd", "p_adjusted_vs_ce", "p_adjusted_vs_teacher"}
    assert row["delta_vs_teacher"] is None  # the teacher's per class needs the store
    assert "worse on 1 class (a: -20.0 points)" in summary["verdict"]


# --------------------------------------------------------------------------- calibration


def test_calibration_matches_hand_computed_values():
    probs = np.array([[0.9, 0.1], [0.65, 0.35], [0.3, 0.7], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 0])  # right, wrong, right, wrong
    out = calibration(probs, labels)
    # 15 bins: the confidences 0.9, 0.65, 0.7, 0.8 fall in bins 13, 9, 10, 12, one each:
    # ECE = (|1 - 0.9| + |0 - 0.65| + |1 - 0.7| + |0 - 0.8|) / 4 = 1.85 / 4
    assert out["ece"] == pytest.approx(0.4625)
    # NLL = -(ln 0.9 + ln 0.35 + ln 0.7 + ln 0.2) / 4
    assert out["nll"] == pytest.approx((0.1053605 + 1.0498221 + 0.3566749 + 1.6094379) / 4)
    # Brier: 0.01 + 0.01, 0.65^2 + 0.65^2, 0.3^2 + 0.3^2, 0.8^2 + 0.8^2 -> (0.02 + 0.845 + 0.18
    # + 1.28) / 4
    assert out["brier"] == pytest.approx(2.325 / 4)
    # 2 bins: all four in [0.5, 1]: accuracy 0.5, mean confidence 0.7625
    assert calibration(probs, labels, bins=2)["ece"] == pytest.approx(0.2625)
    table = reliability(probs, labels, bins=2)
    assert table["count"] == [0, 4] and table["confidence"] == [None, pytest.approx(0.7625)]
    assert table["accuracy"] == [None, 0.5] and table["bin_upper"] == [0.5, 1.0]
    assert calibration(np.array([[1.0, 0.0]]), np.array([1]))["nll"] == pytest.approx(
        -math.log(1e-12))  # clipped, not infinite
    with pytest.raises(DataError, match="labels"):
        calibration(probs, np.array([0, 1, 2, 0]))


# --------------------------------------------------------------------------- error map


def test_error_map_counts_add_up_to_the_errors():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 200)
    student, teacher = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    masks = error_map(student, teacher, labels)
    assert masks["both_wrong"].sum() + masks["fixed"].sum() == (teacher != labels).sum()
    assert masks["both_wrong"].sum() + masks["newly_wrong"].sum() == (student != labels).sum()
    assert not (masks["both_wrong"] & masks["fixed"]).any()
    assert not (masks["fixed"] & masks["newly_wrong"]).any()


# --------------------------------------------------------------------------- with artifacts


def _stored(store: RunStore, strategy: str, seed: int, logits: np.ndarray, labels: np.ndarray,
            teacher: np.ndarray) -> str:
    run_id = store.create({"strategy": strategy, "seed": seed, "epochs": 1})
    np.savez_compressed(store.artifact_dir(run_id) / "test_predictions.npz", logits=logits,
                        labels=labels, teacher_logits=teacher)
    pred, teacher_pred = logits.argmax(1), teacher.argmax(1)
    store.start(run_id)
    accuracy = float((pred == labels).mean())
    store.finish(run_id, {
        "test_accuracy": accuracy, "best_test_accuracy": accuracy,
        "bias_inheritance": bias_inheritance(pred, teacher_pred, labels),
        "teacher_test_accuracy": float((teacher_pred == labels).mean()),
        "per_class_accuracy": {c: float((pred[labels == i] == i).mean())
                               for i, c in enumerate(["x", "y", "z"])}})
    return run_id


def test_summary_with_the_store_pools_error_maps_and_averages_calibration(tmp_path):
    store = RunStore(tmp_path / "ws")
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 120)
    teacher = rng.normal(size=(120, 3)) + 2.0 * np.eye(3)[labels]
    logits = {(s, seed): rng.normal(size=(120, 3)) + (1.0 + seed) * np.eye(3)[labels]
              for s in ("ce", "kd") for seed in range(3)}
    for (strategy, seed), z in logits.items():
        _stored(store, strategy, seed, z, labels, teacher)
    runs = store.list(status="done")
    summary = summarise(runs, store)
    assert summary["notes"] == []
    kd = summary["strategies"]["kd"]
    t_wrong = int((teacher.argmax(1) != labels).sum())
    s_wrong = sum(int((logits["kd", s].argmax(1) != labels).sum()) for s in range(3))
    assert kd["error_map"]["both_wrong"] + kd["error_map"]["fixed"] == 3 * t_wrong
    assert kd["error_map"]["both_wrong"] + kd["error_map"]["newly_wrong"] == s_wrong
    assert summary["calibration"]["teacher"] == pytest.approx(
        calibration(softmax(teacher), labels))
    expected = np.mean([calibration(softmax(logits["kd", s]), labels)["brier"] for s in range(3)])
    assert summary["calibration"]["strategies"]["kd"]["brier"] == pytest.approx(expected)
    assert sum(summary["reliability"]["strategies"]["kd"]["count"]) == 3 * 120
    assert kd["per_class"][0]["delta_vs_teacher"] is not None

    # One unreadable file: that strategy's artifacts are null, one note, no crash.
    broken = next(r for r in runs if r.strategy == "ce")
    (store.artifact_dir(broken.id) / "test_predictions.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="train the run again"):
        load_test_predictions(store, broken)
    summary = summarise(runs, store)
    assert summary["strategies"]["ce"]["error_map"] is None
    assert summary["calibration"]["strategies"]["ce"] is None
    assert summary["calibration"]["strategies"]["kd"] is not None
    assert len(summary["notes"]) == 1 and broken.id in summary["notes"][0]
    assert summarise(runs)["calibration"] is None  # no store: nothing read
