"""Tests for kdcore.analysis.bias: the teacher-bias decomposition of docs/method.md section 1."""

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix

from kdcore.analysis.bias import BiasAccumulator, decompose, predicted_distribution, reliability
from kdcore.errors import DataError

# Five samples, three classes. Teacher argmax per row: 0, 1, 1, 2, 0.
LABELS = np.array([0, 0, 1, 2, 2])
LOGITS = np.array(
    [
        [3.0, 1.0, 0.0],
        [0.0, 2.0, 1.0],
        [0.0, 5.0, 0.0],
        [1.0, 0.0, 4.0],
        [2.0, 0.0, 1.0],
    ]
)


def random_case(n: int = 2000, k: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=n)
    logits = rng.standard_normal((n, k)).astype(np.float32)
    logits[np.arange(n), labels] += 1.0  # a teacher better than chance, with some errors
    return labels, logits


def test_error_confusion_equals_sklearn_confusion_off_diagonal():
    labels, logits = random_case()
    report = decompose(labels, logits)
    expected = confusion_matrix(labels, logits.argmax(axis=1), labels=range(7))
    np.fill_diagonal(expected, 0)
    np.testing.assert_array_equal(report.error_confusion, expected)
    assert report.error_confusion.dtype == np.int64


def test_per_class_bias_rate_is_wrong_over_support_by_hand():
    report = decompose(LABELS, LOGITS, class_names=["cat", "dog", "fox"])
    table = report.per_class.set_index("class")
    # class 0: rows 0 (right), 1 (predicted 1); class 1: row 2 (right); class 2: rows 3 (right),
    # 4 (predicted 0).
    assert table["support"].tolist() == [2, 1, 2]
    assert table["bias_rate"].tolist() == [0.5, 0.0, 0.5]
    assert table["teacher_accuracy"].tolist() == [0.5, 1.0, 0.5]
    assert table["most_confused_with"].tolist() == ["dog", None, "cat"]
    assert table["share_of_errors"].tolist() == [0.5, 0.0, 0.5]
    assert math.isnan(table.loc["dog", "mean_confidence_wrong"])
    softmax_row_1 = np.exp(LOGITS[1]) / np.exp(LOGITS[1]).sum()
    assert table.loc["cat", "mean_confidence_wrong"] == pytest.approx(softmax_row_1.max())
    assert report.accuracy == pytest.approx(0.6)
    assert report.bias_rate == pytest.approx(0.4)
    assert (report.n_samples, report.n_classes) == (5, 3)
    np.testing.assert_array_equal(report.wrong, [False, True, False, False, True])
    np.testing.assert_array_equal(report.predicted, [0, 1, 1, 2, 0])


def test_confidence_is_max_softmax_probability():
    labels, logits = random_case(n=300)
    report = decompose(labels, logits * 30)  # large logits: the shift by the max must hold
    shifted = logits.astype(np.float64) * 30
    probs = np.exp(shifted - shifted.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(report.confidence, probs.max(axis=1), rtol=1e-5)


@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0, 25.0, 59.0, 300.0])
def test_confidence_is_within_3e_6_of_float64_softmax_and_never_above_one(scale):
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((20_000, 10)) * scale).astype(np.float32)
    logits[::7] += 200  # some rows past the unshifted fast path, in the same blocks
    report = decompose(rng.integers(0, 10, len(logits)), logits)
    z = logits.astype(np.float64)
    expected = 1 / np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)
    np.testing.assert_allclose(report.confidence, expected, rtol=3e-6)
    assert report.confidence.max() <= 1.0


def test_top_confusions_sorted_by_count_with_share_of_all_errors():
    labels = np.array([0, 0, 0, 1, 2, 2])
    predicted = np.array([1, 1, 2, 0, 1, 2])
    report = decompose(labels, np.eye(3)[predicted])
    top = report.top_confusions
    assert top[["true", "predicted"]].values.tolist() == [
        ["0", "1"],
        ["0", "2"],
        ["1", "0"],
        ["2", "1"],
    ]
    assert top["count"].tolist() == [2, 1, 1, 1]
    assert top["share"].tolist() == pytest.approx([0.4, 0.2, 0.2, 0.2])


def test_string_labels_map_through_class_names():
    names = ["cat", "dog", "fox"]
    by_name = decompose(np.array(names)[LABELS], LOGITS, class_names=names)
    by_index = decompose(LABELS, LOGITS, class_names=names)
    np.testing.assert_array_equal(by_name.labels, LABELS)
    pd.testing.assert_frame_equal(by_name.per_class, by_index.per_class)
    by_list = decompose(["cat", "cat", "dog", "fox", "fox"], LOGITS, class_names=names)
    np.testing.assert_array_equal(by_list.labels, LABELS)


def test_probabilities_path_matches_logits_path():
    labels, logits = random_case(n=500)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    from_logits = decompose(labels, logits)
    from_probs = decompose(labels, probs, probabilities=True)
    np.testing.assert_array_equal(from_probs.error_confusion, from_logits.error_confusion)
    np.testing.assert_allclose(from_probs.confidence, from_logits.confidence, rtol=1e-5)
    pd.testing.assert_frame_equal(from_probs.per_class, from_logits.per_class, rtol=1e-5)


def test_class_with_zero_support_has_nan_bias_rate_and_null_in_dict():
    report = decompose([0, 0, 1], [[2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0, 2.0, 1.0]])
    row = report.per_class.iloc[2]
    assert row["support"] == 0
    assert math.isnan(row["bias_rate"]) and math.isnan(row["teacher_accuracy"])
    entry = report.to_dict()["per_class"][2]
    assert entry["bias_rate"] is None and entry["teacher_accuracy"] is None
    assert entry["most_confused_with"] is None and entry["mean_confidence_wrong"] is None


def test_teacher_never_wrong_gives_empty_top_confusions_and_null_error_shares():
    report = decompose([0, 1], [[1.0, 0.0], [0.0, 1.0]])
    assert report.bias_rate == 0.0
    assert report.top_confusions.empty
    assert list(report.top_confusions.columns) == ["true", "predicted", "count", "share"]
    assert all(entry["share_of_errors"] is None for entry in report.to_dict()["per_class"])


@pytest.mark.parametrize(
    ("labels", "outputs", "kwargs", "message"),
    [
        ([0, 1], np.zeros((3, 2)), {}, "labels has 2 rows but teacher_outputs has 3"),
        ([0, 1], np.zeros(2), {}, "pass a 2-D array"),
        ([0, 0], np.zeros((2, 1)), {}, "at least 2"),
        ([0, 3, 1], np.zeros((3, 3)), {}, "labels row 1 is 3, outside 0..2"),
        ([0, -1], np.zeros((2, 3)), {}, "labels row 1 is -1"),
        ([0, 1, 0], [[0, 1], [1, 0], [np.nan, 0]], {}, "row 2 holds NaN or inf"),
        ([0, 1], [[0, np.inf], [1, 0]], {}, "row 0 holds NaN or inf"),
        ([0, 1], [[0, 1], [-np.inf, -np.inf]], {}, "row 1 holds NaN or inf"),
        ([], np.zeros((0, 3)), {}, "no rows"),
        (["a", "b"], np.zeros((2, 2)), {}, "pass class_names"),
        (["a", "z"], np.zeros((2, 2)), {"class_names": ["a", "b"]}, "labels row 1 is 'z'"),
        ([0, 1], np.zeros((2, 2)), {"class_names": ["a"]}, "class_names has 1 names"),
        ([0, 1.5], np.zeros((2, 2)), {}, "labels row 1 is 1.5"),
        ([0, 1], [[0.5, 0.5], [2.0, -1.0]], {"probabilities": True}, "row 1 is not a probab"),
    ],
)
def test_bad_input_raises_one_line_data_error(labels, outputs, kwargs, message):
    with pytest.raises(DataError, match=message) as caught:
        decompose(labels, outputs, **kwargs)
    assert "\n" not in str(caught.value)


def test_accumulator_over_chunks_equals_one_shot_decompose():
    labels, logits = random_case(n=3001)
    one_shot = decompose(labels, logits)
    accumulator = BiasAccumulator(7)
    for start in range(0, len(labels), 700):
        accumulator.update(labels[start : start + 700], logits[start : start + 700])
    streamed = accumulator.report()
    assert streamed.labels is None and streamed.confidence is None
    assert streamed.accuracy == pytest.approx(one_shot.accuracy)
    np.testing.assert_array_equal(streamed.error_confusion, one_shot.error_confusion)
    pd.testing.assert_frame_equal(streamed.per_class, one_shot.per_class)
    pd.testing.assert_frame_equal(streamed.top_confusions, one_shot.top_confusions)
    streamed_dict, one_shot_dict = streamed.to_dict(), one_shot.to_dict()
    pd.testing.assert_frame_equal(
        pd.DataFrame(streamed_dict.pop("per_class")), pd.DataFrame(one_shot_dict.pop("per_class"))
    )
    assert streamed_dict == one_shot_dict


def test_accumulator_error_names_row_in_whole_stream():
    accumulator = BiasAccumulator(2)
    accumulator.update([0, 1], [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(DataError, match="labels row 3 is 5"):
        accumulator.update([0, 5], [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(DataError, match="call update"):
        BiasAccumulator(3).report()
    with pytest.raises(DataError, match="3 columns but there are 2 classes"):
        accumulator.update([0], [[1.0, 0.0, 0.0]])


def test_large_input_spans_several_blocks_and_reports_bad_row_globally():
    labels, logits = random_case(n=40_000, k=3)
    report = decompose(labels, logits)
    np.testing.assert_array_equal(report.predicted, logits.argmax(axis=1))
    logits[33_333, 1] = np.nan
    with pytest.raises(DataError, match="row 33333 holds NaN"):
        decompose(labels, logits)


def test_reliability_bin_counts_sum_to_n():
    labels, logits = random_case()
    report = decompose(labels, logits)
    table = reliability(report.confidence, ~report.wrong, n_bins=15)
    assert len(table) == 15
    assert table["count"].sum() == report.n_samples
    assert list(table.columns) == ["bin_lower", "bin_upper", "count", "mean_confidence", "accuracy"]
    filled = table[table["count"] > 0]
    assert (
        (filled["mean_confidence"] >= filled["bin_lower"])
        & (filled["mean_confidence"] <= filled["bin_upper"])
    ).all()
    assert table.loc[table["count"] == 0, "accuracy"].isna().all()


def test_reliability_puts_confidence_one_in_last_bin():
    table = reliability([0.0, 0.05, 1.0, 1.0], [True, False, True, True], n_bins=10)
    assert table["count"].tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table["accuracy"].iloc[[0, 9]].tolist() == [0.5, 1.0]
    with pytest.raises(DataError, match=r"confidence\[1\] = 1.5 is not in \[0, 1\]"):
        reliability([0.5, 1.5], [True, True])


def test_predicted_distribution_counts_argmax_per_class():
    table = predicted_distribution(LOGITS, class_names=["cat", "dog", "fox"])
    assert table["class"].tolist() == ["cat", "dog", "fox"]
    assert table["count"].tolist() == [2, 2, 1]
    assert table["share"].tolist() == pytest.approx([0.4, 0.4, 0.2])


def test_to_dict_is_json_ready():
    labels, logits = random_case(n=200, k=4)
    report = decompose(labels, logits, class_names=["a", "b", "c", "d"])
    payload = report.to_dict(top=3)
    decoded = json.loads(json.dumps(payload, allow_nan=False))
    assert decoded["n_samples"] == 200 and decoded["class_names"] == ["a", "b", "c", "d"]
    assert decoded["teacher_accuracy"] + decoded["bias_rate"] == pytest.approx(1.0)
    assert len(decoded["top_confusions"]) == 3
    assert set(decoded["top_confusions"][0]) == {"true", "predicted", "count", "share"}
    assert set(decoded["per_class"][0]) == {
        "class",
        "support",
        "teacher_accuracy",
        "bias_rate",
        "most_confused_with",
        "mean_confidence_wrong",
        "share_of_errors",
    }
    assert decoded["error_confusion"] == report.error_confusion.tolist()


def test_a_minus_inf_logit_is_a_zero_probability():
    report = decompose([0, 1], np.array([[0.0, -np.inf], [-np.inf, 0.0]], dtype=np.float32))
    assert report.accuracy == 1.0
    assert np.allclose(report.confidence, 1.0)


def test_threaded_rows_match_one_thread_and_name_the_first_bad_row(monkeypatch):
    from kdcore.analysis import bias

    rng = np.random.default_rng(1)
    logits = rng.standard_normal((100_000, 100)).astype(np.float32)  # 10M values: threaded
    labels = rng.integers(0, 100, len(logits))
    threaded = decompose(labels, logits)
    monkeypatch.setattr(bias, "_THREADS", 1)
    single = decompose(labels, logits)
    assert np.array_equal(threaded.predicted, single.predicted)
    assert np.allclose(threaded.confidence, single.confidence, rtol=1e-6)  # BLAS sum order
    monkeypatch.undo()
    logits[75_000, 3] = np.nan
    logits[20_000, 7] = np.inf
    with pytest.raises(DataError, match="row 20000 "):
        decompose(labels, logits)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_rectified_is_swap_rectify_then_softmax(temperature):
    """The dashboard's torch-free rectification equals the loss's (kdcore.learning.losses)."""
    torch = pytest.importorskip("torch")
    from kdcore.analysis.bias import rectified, softened
    from kdcore.learning.losses import swap_rectify

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((500, 7)).astype(np.float32) * 3
    labels = rng.integers(0, 7, len(logits))
    z, y = torch.from_numpy(logits), torch.from_numpy(labels)
    teacher = softened(logits, temperature=temperature)
    assert np.allclose(teacher, torch.softmax(z / temperature, 1).numpy(), atol=1e-6)
    got = rectified(teacher, labels)
    assert (got.argmax(1) == labels).all() and not np.array_equal(got, teacher)
    expected = torch.softmax(swap_rectify(z, y) / temperature, 1).numpy()
    assert np.allclose(got, expected, atol=1e-6)
    # probabilities are read as the logits log p
    probs = torch.softmax(z, 1).numpy()
    assert np.allclose(rectified(softened(probs, probabilities=True, temperature=temperature),
                                 labels), expected, atol=1e-5)


def test_data_and_analysis_import_neither_torch_nor_the_store():
    code = ("import sys, kdcore.data, kdcore.data.sources, kdcore.data.tabular, "
            "kdcore.analysis.analyzer; bad = [m for m in sys.modules if m == 'torch' or "
            "m.startswith(('kdcore.store', 'kdcore.learning'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_above_the_class_limit_the_confusion_is_sparse_and_the_report_the_same(monkeypatch):
    """Above SPARSE_CONFUSION_CLASSES no K x K array is made; every number stays the same."""
    from scipy import sparse

    from kdcore.analysis import bias

    labels, logits = random_case(n=3001, k=12)
    dense = decompose(labels, logits)
    monkeypatch.setattr(bias, "SPARSE_CONFUSION_CLASSES", 11)
    monkeypatch.setattr(bias, "_COMPACT_CELLS", 5)  # merge the accumulated cells often
    one_shot = decompose(labels, logits)
    accumulator = BiasAccumulator(12)
    for start in range(0, len(labels), 400):
        accumulator.update(labels[start : start + 400], logits[start : start + 400])
    for got in (one_shot, accumulator.report()):
        assert sparse.issparse(got.error_confusion)
        np.testing.assert_array_equal(got.error_confusion.toarray(), dense.error_confusion)
        pd.testing.assert_frame_equal(got.per_class, dense.per_class)
        pd.testing.assert_frame_equal(got.top_confusions, dense.top_confusions)
        assert got.accuracy == pytest.approx(dense.accuracy)
        payload, expected = got.to_dict(), dense.to_dict()
        true, predicted = np.nonzero(dense.error_confusion)
        assert payload.pop("error_confusion") == [
            [int(t), int(p), int(dense.error_confusion[t, p])]
            for t, p in zip(true, predicted, strict=True)]
        expected.pop("error_confusion")
        pd.testing.assert_frame_equal(pd.DataFrame(payload.pop("per_class")),
                                      pd.DataFrame(expected.pop("per_class")))
        assert payload == expected
