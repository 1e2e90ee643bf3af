"""Tabular datasets (CSV/Parquet of features, a label and the teacher's logits) for training."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict

from kdcore.data.bundles import load_dataset, sample_bundle_path
from kdcore.data.tabular import load_tabular
from kdcore.errors import DataError
from kdcore.learning.train import TrainConfig, train_student
from kdcore.store.runs import RunStore

LOGITS = ["logit_0", "logit_1", "logit_2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """wine: 13 features, 3 classes; a weak teacher (2 features) whose logits are honest
    out-of-fold predictions, so it makes real mistakes on every split."""
    folder = tmp_path_factory.mktemp("tabular")
    x, y = load_wine(return_X_y=True, as_frame=True)
    teacher = LogisticRegression(max_iter=2000)
    logits = cross_val_predict(teacher, x[["alcohol", "color_intensity"]], y, cv=5,
                               method="decision_function")
    data = x.copy()
    data["y"] = y
    data["sample_id"] = [f"w{i:03d}" for i in range(len(y))]
    for j, col in enumerate(LOGITS):
        data[col] = logits[:, j]
    data.to_csv(folder / "data.csv", index=False)
    data.drop(columns=LOGITS).to_csv(folder / "features.csv", index=False)
    (data[["sample_id", *LOGITS]].sample(frac=1, random_state=1)  # another row order
     .to_csv(folder / "logits.csv", index=False))
    return {"dir": folder, "frame": data, "data": folder / "data.csv",
            "features": folder / "features.csv", "logits": folder / "logits.csv"}


def _cli(*args, workspace):
    return subprocess.run([sys.executable, "-m", "kdcore", *map(str, args), "--workspace",
                           str(workspace), "--quiet"],
                          capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------- the loader


def test_load_tabular_has_the_bundle_interface(files):
    data = load_tabular(files["data"], label_column="y")
    frame = files["frame"]
    assert data.name == "data.csv"
    assert data.class_names == ["0", "1", "2"] and data.n_classes == 3
    assert data.splits == ["train", "test"]
    n_train, n_test = len(data.x("train")), len(data.x("test"))
    assert n_train + n_test == len(frame)
    assert abs(n_test / len(frame) - 0.3) < 0.02
    # stratified: every class keeps its share in the test split
    share = np.bincount(data.y("test")) / np.bincount(frame["y"])
    assert np.all(np.abs(share - 0.3) < 0.03)
    assert data.x("train").dtype == np.float32 and data.x("train").shape[1] == 13
    assert np.allclose(data.x("train").mean(0), 0, atol=1e-5)  # standardised on train rows
    assert data.student_spec == {"type": "mlp", "input_dim": 13, "hidden": [64], "n_classes": 3}
    assert data.teacher_spec is None
    # the teacher's logits follow their rows through the split
    ids = data.sample_ids("test")
    expected = frame.set_index("sample_id").loc[ids, LOGITS].to_numpy(np.float32)
    assert np.array_equal(data.teacher_logits("test"), expected)
    assert np.array_equal(data.y("test"), frame.set_index("sample_id").loc[ids, "y"])


def test_a_bundle_and_a_tabular_file_are_both_datasets(files):
    """Each provides every member of the Dataset protocol; the teacher model is a bundle's."""
    from kdcore.bundles import load_dataset as kept_path
    from kdcore.data import Dataset
    from kdcore.data import load_dataset as from_package
    from kdcore.learning.teachers import load_teacher

    assert from_package is load_dataset is kept_path
    members = [name for name in vars(Dataset) if not name.startswith("_")]
    assert {"sample_ids", "teacher_weights", "data_options", "manifest"} <= set(members)
    tabular, bundle = load_tabular(files["data"], label_column="y"), load_dataset(None)
    for data in (tabular, bundle):
        for name in members:
            assert getattr(data, name) is not None or name in ("teacher_spec", "teacher_weights",
                                                               "image_shape"), name
    assert bundle.sample_ids("train") is None and bundle.data_options == {}
    assert tabular.teacher_weights is None and load_teacher(tabular) is None
    assert load_teacher(bundle).training is False


def test_the_split_depends_on_its_seed_only(files):
    a = load_tabular(files["data"], label_column="y", seed=0)
    b = load_tabular(files["data"], label_column="y", seed=0)
    c = load_tabular(files["data"], label_column="y", seed=1)
    assert np.array_equal(a.sample_ids("test"), b.sample_ids("test"))
    assert not np.array_equal(a.sample_ids("test"), c.sample_ids("test"))


def test_a_separate_logits_file_is_joined_on_sample_id(files):
    inline = load_tabular(files["data"], label_column="y")
    joined = load_tabular(files["features"], label_column="y", teacher_logits=files["logits"])
    for split in ("train", "test"):
        assert np.array_equal(inline.sample_ids(split), joined.sample_ids(split))
        assert np.array_equal(inline.x(split), joined.x(split))
        assert np.array_equal(inline.teacher_logits(split), joined.teacher_logits(split))
    assert joined.data_options["teacher_logits"] == str(files["logits"].resolve())


def test_load_dataset_reloads_from_data_options(files):
    data = load_tabular(files["features"], label_column="y", teacher_logits=files["logits"],
                        hidden=(16, 8), test_size=0.25, seed=3)
    again = load_dataset(str(data.path), **data.data_options)
    assert again.student_spec["hidden"] == [16, 8]
    assert np.array_equal(again.x("test"), data.x("test"))
    assert load_dataset(None).name == "digits_vendor"  # folders are still bundles
    with pytest.raises(DataError, match="--label-column applies to CSV or Parquet files"):
        load_dataset(sample_bundle_path(), label_column="y")


def test_split_column_probabilities_unlabelled_rows_and_parquet(files, tmp_path):
    frame = files["frame"].copy()
    z = frame[LOGITS].to_numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    frame = frame.drop(columns=LOGITS)
    for j in range(3):
        frame[f"prob_{j}"] = p[:, j]
    frame["fold"] = np.array(["train", "unlabelled", "test"])[np.arange(len(frame)) % 3]
    frame["y"] = frame["y"].astype("Float64")
    frame.loc[frame["fold"] == "unlabelled", "y"] = None
    frame = frame.rename(columns={"y": "target"})
    frame.to_parquet(tmp_path / "wine.parquet", index=False)
    data = load_tabular(tmp_path / "wine.parquet", label_column="target", split_column="fold")
    assert data.splits == ["train", "unlabelled", "test"]
    assert data.y("unlabelled") is None
    assert len(data.x("unlabelled")) == (frame["fold"] == "unlabelled").sum()
    # probabilities become logits log(p): the same argmax and the same softmax
    t = data.teacher_logits("train")
    soft = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    rows = (frame["fold"] == "train").to_numpy()
    assert np.allclose(soft, p[rows], atol=1e-5)
    config = TrainConfig.for_bundle(data, strategy="kd+be+br+dl", epochs=2)
    _, result, metrics = train_student(config, data)
    assert len(result.history) == 2 and metrics["teacher_params"] is None


# ----------------------------------------------------------------------------- validation


def _bad(tmp_path, frame, name="bad.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def _with(frame, column, row, value):
    out = frame.copy()
    out[column] = out[column].astype(object)
    out.loc[row, column] = value
    return out


@pytest.mark.parametrize("change, options, message", [
    (lambda f: f, {"label_column": "target"},
     "bad.csv: there is no label column 'target'. Fix: pass --label-column"),
    (lambda f: _with(f, "magnesium", 4, "high"), {},
     "bad.csv, column 'magnesium', data row 5: the value 'high' is not a number. Fix: feature "
     "columns must be numeric"),
    (lambda f: _with(f, "ash", 6, None), {},
     "bad.csv, column 'ash', data row 7: the feature value is empty or NaN. Fix:"),
    (lambda f: _with(f, "y", 2, 5), {},
     "bad.csv, column 'y', data row 3: the label '5' is not one of the classes (0, 1, 2)"),
    (lambda f: _with(f, "logit_1", 8, None), {},
     "bad.csv, column 'logit_1', data row 9: the value is empty or NaN"),
    (lambda f: f.drop(columns=LOGITS), {},
     "bad.csv: there are no teacher-output columns. Fix: add the teacher's logit_<class> "
     "columns"),
    (lambda f: f.assign(split="train"), {},
     "bad.csv, column 'split': no row has split 'test'. Fix:"),
    (lambda f: _with(f.assign(fold="train"), "fold", 2, "val"), {"split_column": "fold"},
     "bad.csv, column 'fold', data row 3: unknown split 'val'. Fix: use one of the allowed "
     "values: train, unlabelled, test (held-out data is 'test')."),
    (lambda f: f.assign(label=1), {},
     "bad.csv, column 'label': a column is named 'label' but the label column is 'y'"),
    (lambda f: f.reset_index(), {},
     "bad.csv, column 'index': it looks like a saved row index"),
])
def test_bad_data_is_one_line_naming_column_row_and_fix(files, tmp_path, change, options,
                                                        message):
    path = _bad(tmp_path, change(files["frame"]))
    options = {"label_column": "y", **options}
    with pytest.raises(DataError) as info:
        load_tabular(path, **options)
    text = str(info.value)
    assert "\n" not in text and "Fix:" in text
    assert text.startswith(message), text


def test_join_problems_name_the_id_and_the_file(files, tmp_path):
    features, logits = files["frame"].drop(columns=LOGITS), pd.read_csv(files["logits"])
    short = _bad(tmp_path, logits[logits["sample_id"] != "w007"], "short.csv")
    with pytest.raises(DataError, match=r"^features.csv, column 'sample_id', data row 8: "
                                        r"sample_id 'w007' is not in short.csv"):
        load_tabular(files["features"], label_column="y", teacher_logits=short)
    extra = pd.concat([logits, pd.DataFrame([{"sample_id": "zz", "logit_0": 0.0,
                                              "logit_1": 0.0, "logit_2": 0.0}])])
    extra_path = _bad(tmp_path, extra, "extra.csv")
    with pytest.raises(DataError, match=r"^extra.csv, column 'sample_id', data row 179: "
                                        r"sample_id 'zz' is not in features.csv"):
        load_tabular(files["features"], label_column="y", teacher_logits=extra_path)
    dup = _bad(tmp_path, _with(logits, "sample_id", 3, logits["sample_id"][4]), "dup.csv")
    with pytest.raises(DataError, match=r"^dup.csv, column 'sample_id', data row 5: .* repeats"):
        load_tabular(files["features"], label_column="y", teacher_logits=dup)
    no_ids = _bad(tmp_path, features.drop(columns=["sample_id"]), "noid.csv")
    with pytest.raises(DataError, match=r"^noid.csv: there is no 'sample_id' column"):
        load_tabular(no_ids, label_column="y", teacher_logits=files["logits"])
    with pytest.raises(DataError, match="a separate teacher-logits file was given too"):
        load_tabular(files["data"], label_column="y", teacher_logits=files["logits"])


# ----------------------------------------------------------------------------- the CLI


def test_cli_train_on_a_csv(files, workspace):
    out = _cli("train", files["data"], "--label-column", "y", "--epochs", "3",
               "--strategy", "kd+be+br+dl", "--json", workspace=workspace)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert 0 <= doc["test_accuracy"] <= 1 and doc["teacher_params"] is None
    assert doc["student_params"] == 13 * 64 + 64 + 64 * 3 + 3
    assert 0 <= doc["bias_inheritance"] <= 1  # the weak teacher is wrong on some test rows
    run = RunStore(workspace).get(doc["run_id"])
    assert run.status == "done"
    assert run.config["data_options"]["label_column"] == "y"
    assert run.config["bundle"] == str(files["data"].resolve())


def test_cli_compare_on_features_and_a_logits_file(files, workspace):
    out = _cli("compare", files["features"], "--label-column", "y", "--teacher-logits",
               files["logits"], "--hidden", "16", "--seeds", "2", "--strategies",
               "kd,kd+be+br", "--epochs", "3", "--json", workspace=workspace)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["bundle"] == "features.csv" and doc["reused_runs"] == 0
    assert set(doc["strategies"]) == {"kd", "kd+be+br"}
    for entry in doc["strategies"].values():
        assert entry["seeds"] == [0, 1] and len(entry["per_seed"]) == 2
        assert entry["student_params"] == 13 * 16 + 16 + 16 * 3 + 3
    assert doc["strategies"]["kd+be+br"]["delta_vs_kd"]["ci95"] is not None
    runs = RunStore(workspace).list()
    assert len(runs) == 4 and {r.status for r in runs} == {"done"}


def test_cli_bad_input_exits_2_and_stores_nothing(files, tmp_path, workspace):
    bad = _bad(tmp_path, _with(files["frame"], "magnesium", 4, "high"))
    out = _cli("train", bad, "--label-column", "y", "--epochs", "1", "--json",
               workspace=workspace)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "column 'magnesium', data row 5" in lines[0]
    out = _cli("compare", files["features"], "--label-column", "y", "--seeds", "2",
               "--strategies", "kd", "--epochs", "1", "--json", workspace=workspace)
    assert out.returncode == 2
    assert "features.csv: there are no teacher-output columns" in out.stderr
    assert RunStore(workspace).list() == []
