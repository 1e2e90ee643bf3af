"""Large Parquet tables: `kdcore analyze` streamed chunk by chunk gives the in-memory document.

The test table: 200,000 rows x 20 classes written in row groups of 50,000 (4 row groups), with
train / unlabelled / test splits (unlabelled rows have no label) and a sample_id column; it is
streamed in chunks of 30,000 rows, so chunks cut across row groups and splits.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdcore.analysis import analyzer as analysis
from kdcore.analysis.analyzer import analyze, analyze_path, analyze_stream, should_stream
from kdcore.data.sources import load_predictions
from kdcore.errors import DataError

N_ROWS, N_CLASSES, ROW_GROUP, CHUNK = 200_000, 20, 50_000, 30_000


def _write(path, *, n=N_ROWS, k=N_CLASSES, splits=("train", "unlabelled", "test"), seed=0,
           nan_row=None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.standard_normal((n, k), dtype=np.float32)
    logits[np.arange(n), labels] += 2.0
    logits[rng.random(n) < 0.1, 3] += 4.0  # a systematic bias toward class c3
    if nan_row is not None:
        logits[nan_row, 1] = np.nan
    columns = {}
    split = None
    if splits:
        split = np.asarray(splits, dtype=object)[rng.integers(0, len(splits), n)]
    unlabelled = split == "unlabelled" if split is not None else np.zeros(n, dtype=bool)
    columns["label"] = pa.array(labels, mask=unlabelled)
    columns.update({f"logit_c{j}": logits[:, j] for j in range(k)})
    if split is not None:
        columns["split"] = pa.array(split.tolist(), type=pa.string())
    columns["sample_id"] = pa.array(np.arange(n) * 7 + 1)
    pq.write_table(pa.table(columns), path, row_group_size=ROW_GROUP)
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = _write(tmp_path_factory.mktemp("stream") / "big.parquet")
    assert pq.ParquetFile(path).metadata.num_row_groups == N_ROWS // ROW_GROUP
    return path


def assert_same(a, b, where="doc"):
    """Equal documents: the same keys, types and values; floats to 1e-6 (relative).

    Counts must match exactly. Confidences are float32 (about 7 digits) and their row sums are
    taken over blocks whose size differs between a streamed and an in-memory pass.
    """
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not (isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-12), where
    else:
        assert a == b and type(a) is type(b), where


def test_streamed_document_equals_the_in_memory_one(big):
    table = load_predictions(big)
    assert_same(analyze(table), analyze_stream(big, batch_rows=CHUNK))
    for split in ("train", "unlabelled", "test"):
        assert_same(analyze(table, split=split, top=5),
                    analyze_stream(big, split=split, top=5, batch_rows=CHUNK))


def test_cli_streams_with_the_flag_and_prints_the_same_json(big):
    out = subprocess.run([sys.executable, "-m", "kdcore", "analyze", str(big), "--stream",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    streamed = json.loads(out.stdout)
    assert streamed["n_samples"] == streamed["splits"]["train"]["n_samples"] + \
        streamed["splits"]["test"]["n_samples"]
    assert streamed["splits"]["unlabelled"]["labelled"] is False
    # label checks need a split in memory: a streamed document says so instead
    assert streamed.pop("likely_label_errors")["available"] is False
    assert streamed.pop("headline_split") == "test"  # the CLI's, beside the engine's keys
    in_memory = json.loads(json.dumps(analyze(load_predictions(big))))  # NaN -> via the CLI
    assert_same(in_memory, streamed)


def test_files_without_split_or_only_unlabelled_rows(tmp_path):
    for splits in ((), ("unlabelled",), ("train", "test")):
        path = _write(tmp_path / f"t{len(splits)}.parquet", n=20_000, k=5, splits=splits)
        assert_same(analyze(load_predictions(path)), analyze_stream(path, batch_rows=3_000))


def test_streaming_is_automatic_above_the_row_threshold(big, tmp_path, monkeypatch):
    assert not should_stream(big)  # 200,000 rows: in memory
    monkeypatch.setattr(analysis, "STREAM_ROWS", 100_000)
    assert should_stream(big)
    called = []
    monkeypatch.setattr(analysis, "analyze_stream",
                        lambda *a, **k: called.append(a) or {"streamed": True})
    assert analyze_path(big) == {"streamed": True} and called
    csv = tmp_path / "small.csv"
    csv.write_text("label,logit_a,logit_b\n0,1.0,0.5\n")
    assert not should_stream(csv)
    assert not should_stream(None) and not should_stream(big, stream=False)
    with pytest.raises(DataError, match="--stream reads Parquet files only"):
        should_stream(csv, stream=True)


def test_a_bad_row_in_a_later_chunk_names_its_row_in_the_file(tmp_path):
    path = _write(tmp_path / "nan.parquet", n=60_000, k=5, nan_row=45_678)
    with pytest.raises(DataError) as streamed:
        analyze_stream(path, batch_rows=10_000)
    with pytest.raises(DataError) as in_memory:
        load_predictions(path)
    assert str(streamed.value) == str(in_memory.value)
    assert "data row 45679" in str(streamed.value)


def test_a_missing_split_is_the_same_error(tmp_path):
    path = _write(tmp_path / "no_test.parquet", n=10_000, k=4, splits=("train", "unlabelled"))
    with pytest.raises(DataError) as streamed:
        analyze_stream(path, split="test")
    with pytest.raises(DataError) as in_memory:
        analyze(load_predictions(path), split="test")
    assert str(streamed.value) == str(in_memory.value)
    assert "no rows in split 'test'; splits present: train, unlabelled" in str(streamed.value)


def test_a_small_file_that_decompresses_past_the_memory_limit_is_streamed(tmp_path):
    """The decision reads rows x classes from the metadata, not the compressed size: 600,000
    rows x 90 float32 outputs are 216 MB in memory (over DEFAULT_MAX_BYTES), in a file of a
    few hundred KB and under STREAM_ROWS rows."""
    n, k = 600_000, 90
    zeros = pa.array(np.zeros(n, dtype=np.float32))  # one buffer for every column
    columns = {"label": pa.array(np.zeros(n, dtype=np.int8))}
    columns.update({f"logit_c{j}": zeros for j in range(k)})
    path = tmp_path / "compressible.parquet"
    pq.write_table(pa.table(columns), path, compression="zstd", write_statistics=False)
    assert path.stat().st_size < 1 << 20 and n < analysis.STREAM_ROWS
    assert n * k * 4 > analysis.DEFAULT_MAX_BYTES
    assert should_stream(path)
    assert not should_stream(path, stream=False)
