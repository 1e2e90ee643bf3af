"""Prediction tables: loading (CSV / Parquet, paths / bytes / uploads) and strict validation."""

from __future__ import annotations

import io
import string

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kdcore.data.tables import (
    PredictionTable,
    iter_parquet_chunks,
    read_prediction_table,
    validate_frame,
)
from kdcore.errors import DataError

GOOD_CSV = (
    "sample_id,label,logit_cat,logit_dog,logit_bird,split\n"
    "s1,cat,2.0,0.5,-1.0,train\n"
    "s2,dog,0.1,3.0,0.2,train\n"
    "s3,,0.3,0.2,4.0,unlabelled\n"
    "s4,bird,1.0,1.0,1.5,test\n"
)


def parquet_bytes(df: pd.DataFrame, **kwargs) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False, **kwargs)
    return buf.getvalue()


def error(data, *, name: str = "preds.csv", **kwargs) -> str:
    """The DataError message for ``data``; every message is one line and names the file."""
    with pytest.raises(DataError) as info:
        read_prediction_table(data, name=name, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(name.split("/")[-1])
    assert "Fix: " in message
    return message


def frame_error(df: pd.DataFrame, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        validate_frame(df, source="frame.csv", **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith("frame.csv") and "Fix: " in message
    return message


def csv(text: str) -> bytes:
    return text.encode("utf-8")


# --------------------------------------------------------------------------------------------
# Good tables


def check_good(table: PredictionTable, source: str) -> None:
    assert table.source == source
    assert table.class_names == ["cat", "dog", "bird"]
    assert table.kind == "logits" and not table.probabilities
    assert table.outputs.dtype == np.float32 and table.outputs.shape == (4, 3)
    np.testing.assert_allclose(table.outputs[0], [2.0, 0.5, -1.0])
    assert table.labels.dtype == np.int64
    assert table.labels.tolist() == [0, 1, -1, 2]
    assert table.split.tolist() == ["train", "train", "unlabelled", "test"]
    assert table.sample_id.tolist() == ["s1", "s2", "s3", "s4"]
    assert table.extra is None
    assert (table.n_samples, table.n_classes) == (4, 3)
    assert table.splits == ["train", "unlabelled", "test"]


def test_csv_round_trip_from_path(tmp_path):
    path = tmp_path / "teacher.csv"
    path.write_text(GOOD_CSV)
    check_good(read_prediction_table(path), "teacher.csv")
    check_good(read_prediction_table(str(path)), "teacher.csv")


def test_parquet_round_trip_from_path_and_bytes(tmp_path):
    df = pd.read_csv(io.StringIO(GOOD_CSV), keep_default_na=False)
    data = parquet_bytes(df)
    path = tmp_path / "teacher.data"  # the extension is irrelevant: the content decides
    path.write_bytes(data)
    check_good(read_prediction_table(path), "teacher.data")
    check_good(read_prediction_table(data, name="t.parquet"), "t.parquet")


def test_parquet_with_float_labels_and_nan():
    # pandas turns an int column with missing values into floats (0.0, NaN ...)
    df = pd.DataFrame(
        {
            "label": [0.0, np.nan, 2.0],
            "prob_a": [0.2, 0.5, 0.1],
            "prob_b": [0.3, 0.5, 0.1],
            "prob_c": [0.5, 0.0, 0.8],
            "split": ["train", "unlabelled", "test"],
        }
    )
    table = read_prediction_table(parquet_bytes(df), name="p.parquet")
    assert table.kind == "probabilities" and table.probabilities
    assert table.labels.tolist() == [0, -1, 2]
    assert table.class_names == ["a", "b", "c"]


def test_int_labels_and_csv_written_by_pandas():
    df = pd.DataFrame(
        {"label": [1, 0, None], "logit_x": [0.1, 0.2, 0.3], "logit_y": [1.0, 2.0, 3.0]}
    )
    df["split"] = ["train", "test", "unlabelled"]
    table = read_prediction_table(df.to_csv(index=False).encode(), name="ints.csv")
    assert table.labels.tolist() == [1, 0, -1]  # "1.0" in the CSV is the index 1
    assert table.split is not None and table.sample_id is None


def test_numeric_class_names_match_labels_by_value():
    text = "label,logit_3,logit_5,logit_7\n3,1,2,3\n7,1,2,3\n5,0,0,0\n"
    table = read_prediction_table(csv(text), name="n.csv")
    assert table.class_names == ["3", "5", "7"]
    assert table.labels.tolist() == [0, 2, 1]
    msg = error(csv("label,logit_3,logit_5\n0,1,2\n"))
    assert "data row 1" in msg and "'0'" in msg and "class names here are numbers" in msg


def test_bytes_and_file_like_with_display_name():
    data = csv(GOOD_CSV)
    check_good(read_prediction_table(io.BytesIO(data), name="up.csv"), "up.csv")
    # the display name is only ever a base name, never a path
    table = read_prediction_table(data, name="/home/alice/secret/upload.csv")
    assert table.source == "upload.csv"
    assert read_prediction_table(data, name="C:\\Users\\bob\\x.csv").source == "x.csv"
    assert read_prediction_table(data).source == "uploaded file"
    msg = error(b"", name="../../etc/data.csv")
    assert msg.startswith("data.csv:") and "etc" not in msg


def test_utf8_bom_and_crlf_and_extra_columns():
    text = "\ufefflabel,prob_a,prob_b,feat\r\na,0.25,0.75,x\r\nb,1,0,y\r\n"
    msg = error(csv(text), name="f.csv")
    assert "column 'feat'" in msg and "unknown column" in msg
    table = read_prediction_table(csv(text), name="f.csv", extra_columns=["feat"])
    assert table.labels.tolist() == [0, 1]
    assert table.extra is not None and table.extra["feat"].tolist() == ["x", "y"]


def test_subset_and_splits():
    table = read_prediction_table(csv(GOOD_CSV), name="g.csv")
    train = table.subset("train")
    assert train.n_samples == 2 and train.labels.tolist() == [0, 1]
    assert train.splits == ["train"] and train.class_names == table.class_names
    assert table.subset("test").sample_id.tolist() == ["s4"]
    with pytest.raises(DataError, match="unknown split 'val'"):
        table.subset("val")
    no_split = read_prediction_table(csv("label,logit_a,logit_b\n0,1,2\n"), name="n.csv")
    assert no_split.splits == []
    with pytest.raises(DataError, match="no split column"):
        no_split.subset("train")


def test_validate_frame_ignores_the_index():
    df = pd.read_csv(io.StringIO(GOOD_CSV), keep_default_na=False)
    df.index = [10, 20, 30, 40]
    check_good(validate_frame(df, source="frame"), "frame")
    df.loc[30, "label"] = ""
    df.loc[30, "split"] = "test"
    msg = frame_error(df)
    assert "column 'label', data row 3" in msg


# --------------------------------------------------------------------------------------------
# Every validation case, with its message


def test_empty_file(tmp_path):
    assert "the file is empty" in error(b"")
    assert "the file is empty" in error(b"  \n\n")
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"^empty\.csv: the file is empty\. Fix: "):
        read_prediction_table(path)


def test_header_without_rows():
    assert "no data rows" in error(csv("label,logit_a,logit_b\n"))
    df = pd.DataFrame({"label": pd.Series([], dtype=int), "logit_a": [], "logit_b": []})
    assert "no data rows" in error(parquet_bytes(df), name="e.parquet")


def test_file_too_large(tmp_path):
    data = csv(GOOD_CSV)
    msg = error(data, max_bytes=100)
    assert "over the 100 bytes limit" in msg and "iter_parquet_chunks" in msg
    path = tmp_path / "big.csv"
    path.write_bytes(data)
    with pytest.raises(DataError, match=r"^big\.csv: the file is \d+ bytes, over the 100"):
        read_prediction_table(path, max_bytes=100)
    assert "larger than the 100 bytes limit" in error(io.BytesIO(data), max_bytes=100)


def test_binary_garbage():
    msg = error(bytes(range(256)) * 4, name="blob.bin")
    assert "is not a CSV or Parquet file" in msg and "binary" in msg
    msg = error(b"PK\x03\x04" + b"\x00" * 50, name="book.xlsx")
    assert "Excel" in msg and "CSV UTF-8" in msg


def test_not_utf8():
    text = "label,logit_a,logit_b\ncafé,1,2\n".encode("latin-1")
    msg = error(text, name="latin.csv")
    assert "is not UTF-8 text" in msg and "0xe9" in msg and "line 2" in msg
    assert "UTF-8 CSV" in msg
    msg = error("label,logit_a,logit_b\n0,1,2\n".encode("utf-16"), name="u16.csv")
    assert "UTF-16 text; save it as UTF-8 CSV" in msg


def test_short_row():
    msg = error(csv("label,logit_a,logit_b\n0,1,2\n1,2,3\n1,2\n0,1,1\n"))
    assert "data row 3" in msg and "line 4 of the file has 2 fields but the header has 3" in msg


def test_long_row():
    msg = error(csv("label,logit_a,logit_b\n0,1,2\n1,2,3,4\n"))
    assert "data row 2" in msg and "has 4 fields but the header has 3" in msg
    assert "quote values that contain commas" in msg


def test_unclosed_quote():
    msg = error(csv('label,logit_a,logit_b\n0,1,2\n1,"2,3\n0,1,1\n'))
    assert "quoted value is never closed" in msg and "data row 2" in msg and "line 3" in msg


def test_semicolon_separated():
    msg = error(csv("label;logit_a;logit_b\n0;1;2\n"))
    assert "separated by semicolons" in msg and "comma-separated" in msg


def test_missing_label_column():
    msg = error(csv("logit_a,logit_b\n1,2\n"))
    assert "there is no 'label' column" in msg and "add a 'label' column" in msg
    assert "rename 'Label' to 'label'" in error(csv("Label,logit_a,logit_b\n0,1,2\n"))


def test_no_output_columns():
    msg = error(csv("label,score_a,score_b\n0,1,2\n"))
    assert "no teacher-output columns (found score_a, score_b)" in msg
    assert "logit_<class>" in msg and "prob_<class>" in msg


def test_mixed_output_kinds():
    msg = error(csv("label,logit_a,prob_b\n0,1,0.5\n"))
    assert "mixes logit_ columns (logit_a" in msg and "prob_ columns (prob_b" in msg
    assert "one kind per file" in msg


def test_duplicated_column_names():
    msg = error(csv("label,logit_a,logit_b,logit_a\n0,1,2,3\n"))
    assert "column 'logit_a': the column name appears more than once" in msg
    df = pd.DataFrame([[0, 1.0, 2.0, 0]], columns=["label", "logit_a", "logit_b", "label"])
    assert "column 'label'" in frame_error(df) and "more than once" in frame_error(df)


def test_unknown_column():
    msg = error(csv("label,logit_a,logit_b,notes\n0,1,2,hi\n"))
    assert "column 'notes': unknown column" in msg and "remove or rename it" in msg
    msg = error(csv(",label,logit_a,logit_b\n0,0,1,2\n"))
    assert "column ''" in msg and "index=False" in msg
    assert "rename it to 'split'" in error(csv("label,logit_a,logit_b,Split\n0,1,2,train\n"))
    msg = error(csv("label,logit_a, logit_b\n0,1,2\n"))
    assert "column ' logit_b': unknown column" in msg and "rename it to 'logit_b'" in msg


def test_unknown_column_in_parquet_index():
    df = pd.DataFrame({"label": [0, 1], "logit_a": [1.0, 2.0], "logit_b": [0.0, 0.1]})
    df.index = [5, 6]
    buf = io.BytesIO()
    df.to_parquet(buf)  # keeps the index as a column
    msg = error(buf.getvalue(), name="i.parquet")
    assert "__index_level_0__" in msg and "index=False" in msg


def test_fewer_than_two_classes():
    msg = error(csv("label,logit_a\n0,1\n"))
    assert "only one class (logit_a)" in msg and "at least two" in msg
    assert "class name after the prefix is empty" in error(csv("label,logit_,logit_b\n0,1,2\n"))


def test_non_numeric_output_csv():
    msg = error(csv("label,logit_a,logit_b\n0,1,2\n1,2,3\n0,1,abc\n"))
    assert "column 'logit_b', data row 3: the value 'abc' is not a number" in msg


def test_non_numeric_output_parquet_and_frame():
    df = pd.DataFrame({"label": [0, 1], "logit_a": ["1.5", "oops"], "logit_b": [0.0, 1.0]})
    msg = error(parquet_bytes(df), name="s.parquet")
    assert "column 'logit_a', data row 2: the value 'oops' is not a number" in msg
    df = pd.DataFrame({"label": [0, 1], "logit_a": [True, False], "logit_b": [0.0, 1.0]})
    assert "'True' is not a number" in frame_error(df)


def test_nan_and_inf_outputs():
    msg = error(csv("label,logit_a,logit_b\n0,1,2\n1,,3\n"))
    assert "column 'logit_a', data row 2: the value is empty or NaN" in msg
    msg = error(csv("label,logit_a,logit_b\n0,1,2\n1,2,NaN\n"))
    assert "column 'logit_b', data row 2: the value is empty or NaN" in msg
    msg = error(csv("label,logit_a,logit_b\n0,1,2\n1,2,3\n1,-inf,3\n"))
    assert "column 'logit_a', data row 3: the value is infinite" in msg
    msg = error(csv("label,logit_a,logit_b\n0,1e39,2\n"))
    assert "too large for float32" in msg


def test_negative_probability():
    msg = error(csv("label,prob_a,prob_b\n0,0.5,0.5\n1,-0.25,1.25\n"))
    assert "column 'prob_a', data row 2: the probability -0.25 is negative" in msg
    assert "logit_<class>" in msg


def test_probabilities_not_summing_to_one():
    text = "label,prob_a,prob_b\n0,0.5,0.5\n1,0.3,0.7004\n1,0.3,0.6\n"
    msg = error(csv(text))
    assert "data row 3: the prob_ columns sum to 0.9, not 1 (tolerance 0.001)" in msg
    assert "normalise" in msg and "logit_<class>" in msg


def test_unknown_label_name():
    msg = error(csv("label,logit_cat,logit_dog\ncat,1,2\nDog,1,2\n"))
    assert "column 'label', data row 2: the label 'Dog' is not a class name (cat, dog)" in msg
    assert "exact spelling" in msg


def test_label_index_out_of_range():
    msg = error(csv("label,logit_cat,logit_dog\n0,1,2\n1,1,2\n2,1,2\n"))
    assert "column 'label', data row 3: the label '2' is not a class index 0..1" in msg
    msg = error(csv("label,logit_cat,logit_dog\n0,1,2\n1.5,1,2\n"))
    assert "data row 2" in msg and "'1.5'" in msg


def test_empty_label_on_labelled_row():
    msg = error(csv("label,logit_a,logit_b,split\n0,1,2,train\n,1,2,unlabelled\n,1,2,test\n"))
    assert "column 'label', data row 3: the label is empty but its split is 'test'" in msg
    assert "'unlabelled'" in msg
    msg = error(csv("label,logit_a,logit_b\n0,1,2\n,1,2\n"))
    assert "data row 2: the label is empty but there is no split column" in msg


def test_duplicated_sample_id():
    text = "sample_id,label,logit_a,logit_b\nx1,0,1,2\nx2,0,1,2\nx3,0,1,2\nx2,1,1,2\n"
    msg = error(csv(text))
    assert "column 'sample_id', data row 4: sample_id 'x2' repeats data row 2" in msg
    assert "sample_id is empty" in error(csv("sample_id,label,logit_a,logit_b\n,0,1,2\n"))


def test_unknown_split():
    msg = error(csv("label,logit_a,logit_b,split\n0,1,2,train\n1,1,2,validation\n"))
    assert "column 'split', data row 2: unknown split 'validation'" in msg
    assert "allowed values: train, unlabelled, test" in msg
    assert "write 'unlabelled'" in error(csv("label,logit_a,logit_b,split\n,1,2,unlabeled\n"))
    assert "the split is empty" in error(csv("label,logit_a,logit_b,split\n0,1,2,\n"))


def test_corrupt_parquet():
    good = parquet_bytes(pd.DataFrame({"label": [0], "logit_a": [1.0], "logit_b": [2.0]}))
    msg = error(good[: len(good) // 2], name="cut.parquet")
    assert "starts like a Parquet file but cannot be read" in msg


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"^nope\.csv: the file does not exist"):
        read_prediction_table(tmp_path / "nope.csv")


# --------------------------------------------------------------------------------------------
# Only DataError, whatever the input


COLUMN_NAMES = st.sampled_from(
    [
        "label",
        "split",
        "sample_id",
        "logit_a",
        "logit_b",
        "logit_c",
        "prob_a",
        "prob_b",
        "logit_",
        "extra",
        "Label",
        "",
    ]
) | st.text(alphabet=string.printable, max_size=8)

CELL_TEXT = st.sampled_from(
    [
        "",
        "a",
        "b",
        "0",
        "1",
        "2",
        "-1",
        "1.5",
        "nan",
        "inf",
        "train",
        "test",
        "unlabelled",
        "x",
        "0.5",
        "1e40",
        " ",
        '"',
        "é",
    ]
) | st.text(max_size=6)


LAYOUTS = st.sampled_from(
    [
        ["label", "logit_a", "logit_b"],
        ["label", "prob_a", "prob_b", "split"],
        ["sample_id", "label", "logit_a", "logit_b", "logit_c", "split"],
        ["label", "prob_a", "prob_b", "prob_c", "sample_id"],
    ]
)
PLAUSIBLE = {
    "label": st.sampled_from(["a", "b", "c", "0", "1", "2", "", "3", "A"]),
    "split": st.sampled_from(["train", "unlabelled", "test", "", "val"]),
    "sample_id": st.sampled_from(["s1", "s2", "s3", "s4", ""]),
}


def column_values(draw, name: str, n: int) -> pd.Series:
    """Values for one column: usually what the column should hold, sometimes anything."""
    kind = draw(st.sampled_from(["plausible", "plausible", "float", "int", "text", "bool"]))
    if kind == "plausible" and name in PLAUSIBLE:
        return pd.Series(draw(st.lists(PLAUSIBLE[name], min_size=n, max_size=n)), dtype=object)
    if kind == "plausible" and name.startswith("prob_"):
        probs = st.sampled_from([0.0, 0.25, 0.5, 1.0, 1 / 3])
        return pd.Series(draw(st.lists(probs, min_size=n, max_size=n)), dtype="float64")
    if kind in ("plausible", "float"):
        floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
        return pd.Series(draw(st.lists(floats, min_size=n, max_size=n)), dtype="float64")
    if kind == "int":
        ints = st.integers(-3, 5)
        return pd.Series(draw(st.lists(ints, min_size=n, max_size=n)), dtype="int64")
    if kind == "bool":
        return pd.Series(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    cells = st.none() | CELL_TEXT
    return pd.Series(draw(st.lists(cells, min_size=n, max_size=n)), dtype=object)


@st.composite
def malformed_frames(draw) -> pd.DataFrame:
    if draw(st.booleans()):
        names = list(draw(LAYOUTS))
        if draw(st.booleans()):  # break the layout a little
            at = draw(st.integers(0, len(names)))
            names.insert(at, draw(COLUMN_NAMES))
        if draw(st.booleans()):
            names.pop(draw(st.integers(0, len(names) - 1)))
    else:
        names = draw(st.lists(COLUMN_NAMES, min_size=0, max_size=6))
    n = draw(st.integers(0, 6))
    if not names:
        return pd.DataFrame(index=range(n))
    df = pd.concat([column_values(draw, str(c), n) for c in names], axis=1, ignore_index=True)
    df.columns = names
    return df


def only_data_errors(call) -> PredictionTable | None:
    try:
        table = call()
    except DataError as exc:
        assert "\n" not in str(exc) and "Fix: " in str(exc)
        return None
    else:
        assert isinstance(table, PredictionTable)
        assert table.outputs.dtype == np.float32 and np.isfinite(table.outputs).all()
        assert table.labels.dtype == np.int64
        assert ((table.labels >= -1) & (table.labels < table.n_classes)).all()
        return table


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), parquet_prefix=st.booleans())
def test_random_bytes_raise_only_data_error(data, parquet_prefix):
    if parquet_prefix:
        data = b"PAR1" + data
    only_data_errors(lambda: read_prediction_table(data, name="fuzz.bin"))
    only_data_errors(lambda: read_prediction_table(io.BytesIO(data), name="fuzz.bin"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(df=malformed_frames(), cut=st.integers(0, 4000), flip=st.integers(0, 4000))
def test_malformed_frames_raise_only_data_error(df, cut, flip):
    event("valid" if only_data_errors(lambda: validate_frame(df, source="fuzz")) else "refused")
    text = df.to_csv(index=False).encode("utf-8")
    only_data_errors(lambda: read_prediction_table(text, name="fuzz.csv"))
    only_data_errors(lambda: read_prediction_table(text[: cut % (len(text) + 1)], name="f.csv"))
    try:
        table = pa.Table.from_pandas(df, preserve_index=False)
        buf = io.BytesIO()
        pq.write_table(table, buf)
    except (pa.ArrowException, ValueError, TypeError):
        return  # duplicate names or the like: pyarrow will not even write it
    data = buf.getvalue()
    only_data_errors(lambda: read_prediction_table(data, name="fuzz.parquet"))
    broken = bytearray(data)
    broken[flip % len(broken)] ^= 0xFF
    only_data_errors(lambda: read_prediction_table(bytes(broken), name="fuzz.parquet"))
    only_data_errors(lambda: read_prediction_table(data[: 4 + cut % len(data)], name="c.parquet"))


# --------------------------------------------------------------------------------------------
# Streaming Parquet


def big_frame(n: int = 1000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 4)).astype(np.float32)
    split = rng.choice(["train", "unlabelled", "test"], size=n)
    labels = np.where(split == "unlabelled", None, rng.choice(["w", "x", "y", "z"], size=n))
    df = pd.DataFrame({"sample_id": [f"id{i}" for i in range(n)], "label": labels, "split": split})
    for j, name in enumerate("wxyz"):
        df[f"logit_{name}"] = logits[:, j]
    df["feat"] = rng.normal(size=n)
    return df


def test_chunks_equal_one_shot(tmp_path):
    path = tmp_path / "big.parquet"
    big_frame().to_parquet(path, index=False, row_group_size=150)
    assert pq.ParquetFile(path).num_row_groups > 5
    whole = read_prediction_table(path, extra_columns=["feat"])
    chunks = list(iter_parquet_chunks(path, batch_rows=128, extra_columns=["feat"]))
    assert len(chunks) > 5 and all(c.n_samples <= 128 for c in chunks)
    assert all(c.class_names == ["w", "x", "y", "z"] for c in chunks)
    assert all(c.source == "big.parquet" for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c.outputs for c in chunks]), whole.outputs)
    np.testing.assert_array_equal(np.concatenate([c.labels for c in chunks]), whole.labels)
    np.testing.assert_array_equal(np.concatenate([c.split for c in chunks]), whole.split)
    np.testing.assert_array_equal(np.concatenate([c.sample_id for c in chunks]), whole.sample_id)
    pd.testing.assert_frame_equal(
        pd.concat([c.extra for c in chunks], ignore_index=True), whole.extra
    )
    # without extra_columns the column is refused straight away, before any chunk is read
    with pytest.raises(DataError, match="column 'feat': unknown column"):
        iter_parquet_chunks(path)


def test_chunk_errors_count_rows_from_the_start(tmp_path):
    df = big_frame(600)
    df.loc[437, "logit_y"] = np.nan
    path = tmp_path / "bad.parquet"
    df.to_parquet(path, index=False, row_group_size=100)
    with pytest.raises(DataError, match=r"column 'logit_y', data row 438: .*empty or NaN"):
        list(iter_parquet_chunks(path, batch_rows=100, extra_columns=["feat"]))
    with pytest.raises(DataError, match=r"column 'logit_y', data row 438: .*empty or NaN"):
        read_prediction_table(path, extra_columns=["feat"])


def test_chunk_duplicate_sample_id_across_chunks(tmp_path):
    df = big_frame(300)
    df.loc[250, "sample_id"] = "id7"
    path = tmp_path / "dup.parquet"
    df.drop(columns="feat").to_parquet(path, index=False)
    with pytest.raises(DataError, match=r"data row 251: sample_id 'id7' already appeared"):
        list(iter_parquet_chunks(path, batch_rows=100))


def test_chunks_refuse_csv(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(GOOD_CSV)
    with pytest.raises(DataError, match=r"^t\.csv: is not a Parquet file"):
        iter_parquet_chunks(path)
