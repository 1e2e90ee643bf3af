"""`kdcore analyze` on the bundled sample and on prediction tables."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from kdcore.data.bundles import load_bundle


def _analyze(*args):
    return subprocess.run([sys.executable, "-m", "kdcore", "analyze", *args],
                          capture_output=True, text=True, timeout=120)


def test_analyze_json_on_the_sample_has_every_split():
    out = _analyze("--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    for key in ("n_samples", "n_classes", "class_names", "teacher_accuracy", "bias_rate",
                "per_class", "error_confusion", "top_confusions", "splits"):
        assert key in doc
    assert set(doc["splits"]) == {"train", "unlabelled", "test"}
    assert "predicted_distribution" in doc["splits"]["unlabelled"]
    assert {"class", "support", "teacher_accuracy", "bias_rate", "most_confused_with"} <= set(
        doc["per_class"][0])


def test_analyze_test_split_agrees_with_sklearn():
    bundle = load_bundle()
    doc = json.loads(_analyze("--split", "test", "--json").stdout)
    y, pred = bundle.y("test"), bundle.teacher_logits("test").argmax(1)
    expected = confusion_matrix(y, pred, labels=range(10))
    np.fill_diagonal(expected, 0)
    assert np.array_equal(np.array(doc["error_confusion"]), expected)
    assert doc["teacher_accuracy"] == (y == pred).mean()


def test_the_sample_teacher_is_systematically_biased_on_4s_and_7s():
    doc = json.loads(_analyze("--split", "test", "--json").stdout)
    top = {(c["true"], c["predicted"]) for c in doc["top_confusions"][:2]}
    assert top == {("4", "9"), ("7", "1")}


def test_analyze_a_csv_prediction_table(tmp_path):
    bundle = load_bundle()
    logits = bundle.teacher_logits("test")
    df = pd.DataFrame(logits, columns=[f"logit_{c}" for c in bundle.class_names])
    df.insert(0, "label", bundle.y("test"))
    path = tmp_path / "preds.csv"
    df.to_csv(path, index=False)
    doc = json.loads(_analyze(str(path), "--json").stdout)
    assert doc["n_samples"] == len(df)
    assert doc["teacher_accuracy"] == (logits.argmax(1) == bundle.y("test")).mean()


def test_analyze_bad_file_exits_2_with_one_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("label,logit_a,logit_b\n0,1.0,oops\n")
    out = _analyze(str(path), "--json")
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "bad.csv" in out.stderr


def test_the_override_source_is_the_content_not_the_name(tmp_path):
    """The CLI and the dashboard key a source's overrides by its content: the same key."""
    from kdcore.data.sources import bundle_table, load_predictions, source_key
    from kdcore.data.tables import read_prediction_table

    assert source_key(load_predictions(None)) == source_key(bundle_table(load_bundle()))
    bundle = load_bundle()
    df = pd.DataFrame(bundle.teacher_logits("test"),
                      columns=[f"logit_{c}" for c in bundle.class_names])
    df.insert(0, "label", bundle.y("test"))
    path = tmp_path / "preds.csv"
    df.to_csv(path, index=False)
    uploaded = read_prediction_table(path.read_bytes(), name="renamed.csv")
    assert source_key(load_predictions(path)) == source_key(uploaded)


def test_a_closed_pipe_ends_quietly_with_status_0():
    """`kdcore analyze --json | head -c 1`: the reader closes the pipe before the document is
    written; the command ends with 0 and says nothing (it failed with BrokenPipeError before)."""
    script = ("set -o pipefail; " + " ".join([sys.executable, "-m", "kdcore", "analyze", "--json"])
              + " | head -c 1 >/dev/null")
    for _ in range(3):  # the race that made it fail sometimes: the reader is always gone here
        proc = subprocess.run(["bash", "-c", f"sleep 0; {script}"], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""


def _iris_files(folder):
    """A features file (sample_id, f0..f3, species) and the teacher's logits in another file."""
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    ids = [f"r{i}" for i in range(len(y))]
    features = pd.DataFrame(x, columns=[f"f{i}" for i in range(4)])
    features.insert(0, "sample_id", ids)
    features["species"] = y
    logits = np.eye(3)[y] * 3 + np.random.default_rng(0).normal(0, 1.5, (len(y), 3))
    teacher = pd.DataFrame(logits, columns=[f"logit_{c}" for c in range(3)])
    teacher.insert(0, "sample_id", ids)
    features.to_csv(folder / "features.csv", index=False)
    teacher.to_csv(folder / "logits.csv", index=False)
    return folder / "features.csv", folder / "logits.csv", y, logits


def test_analyze_takes_a_features_file_and_a_logits_file_like_compare(tmp_path):
    features, logits_file, y, logits = _iris_files(tmp_path)
    out = _analyze(str(features), "--label-column", "species", "--teacher-logits",
                   str(logits_file), "--json", "--workspace", str(tmp_path / "ws"))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["n_samples"] == len(y)
    assert abs(doc["teacher_accuracy"] - float((logits.argmax(1) == y).mean())) < 1e-9
    assert doc["likely_label_errors"]["available"]  # the features feed the label check


def test_a_features_file_without_logits_says_the_logits_are_missing(tmp_path):
    features, *_ = _iris_files(tmp_path)
    out = _analyze(str(features))
    assert out.returncode == 2
    assert "no teacher-output columns" in out.stderr and "--teacher-logits" in out.stderr
    assert "'label'" not in out.stderr


def test_the_headline_is_the_held_out_split_as_on_the_dashboard():
    """One headline split for the CLI and the dashboard (held-out rows when there are any),
    said next to the number; shares in the text are percentages with one decimal; the
    label-error sentence counts only the mistakes that were assessed."""
    doc = json.loads(_analyze("--json").stdout)
    assert doc["headline_split"] == "test"
    test = doc["splits"]["test"]
    text = _analyze().stdout
    assert (f"Teacher accuracy {test['teacher_accuracy'] * 100:.1f}%, bias rate "
            f"{test['bias_rate'] * 100:.1f}% on held-out rows (test)") in text
    assert f"on all labelled rows {doc['teacher_accuracy'] * 100:.1f}%" in text
    assert "0.3" not in text.split("Teacher accuracy", 1)[1].split("Of ", 1)[0]  # no proportions
    assessed = sum(p["likely_label_errors"]["n_teacher_wrong"] for p in doc["splits"].values()
                   if (p.get("likely_label_errors") or {}).get("available"))
    assert f"Of {assessed} teacher mistakes" in text


def test_the_label_error_count_covers_only_the_assessed_rows(tmp_path):
    """A prediction table has no features: its train rows cannot be assessed, so the text
    counts the test rows' mistakes only and says the train rows were not assessed."""
    bundle = load_bundle()
    frames = []
    for split in ("train", "test"):
        frame = pd.DataFrame(bundle.teacher_logits(split),
                             columns=[f"logit_{c}" for c in bundle.class_names])
        frame.insert(0, "label", bundle.y(split))
        frame.insert(0, "split", split)
        frames.append(frame)
    path = tmp_path / "preds.csv"
    pd.concat(frames).to_csv(path, index=False)
    doc = json.loads(_analyze(str(path), "--json").stdout)
    test = doc["splits"]["test"]["likely_label_errors"]
    assert not doc["splits"]["train"]["likely_label_errors"]["available"]
    text = _analyze(str(path)).stdout
    assert f"Of {test['n_teacher_wrong']} teacher mistakes on the test rows" in text
    assert "The train rows were not assessed" in text
    assert f"Of {doc['likely_label_errors']['n_teacher_wrong']} teacher mistakes," not in text
