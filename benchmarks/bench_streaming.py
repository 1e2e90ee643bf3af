"""Stream-analyse a 10,000,000 x 100 float32 Parquet prediction table; time and memory.

Run: ``python benchmarks/bench_streaming.py`` (``--rows N`` for a smaller file). It

1. checks the free disk space (``shutil.disk_usage``; scales the rows down, and says so, if
   the file would not fit with room to spare), then writes the table to a temporary folder in
   row groups of 1,000,000 rows with ``pyarrow.parquet.ParquetWriter``, generating each group
   on the fly (``label``, ``split`` and 100 ``logit_`` columns; the teacher is right about half
   the time);
2. as the baseline, times one plain pyarrow read pass over the same columns
   (``ParquetFile.iter_batches``, nothing computed), opened as kdcore opens it
   (``pre_buffer=False``: pyarrow's default keeps every row group's bytes until the read ends,
   so its memory grows with the file);
3. times ``kdcore.analysis.analyzer.analyze_stream`` on it (validation of every chunk, one
   ``BiasAccumulator`` per split, the same JSON document as ``kdcore analyze``);
4. runs the two passes twice, alternately, and prints the faster of each, their ratio, and
   each pass's peak RSS (``ru_maxrss``) and its growth; the in-memory size of the logits is
   printed for comparison;
5. deletes the file.

Each pass runs in a fresh process, so its peak RSS is its own, not the generator's. The file
was just written, so every pass reads it from the page cache where it fits in memory.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import peak_rss_mb, rss_mb  # noqa: E402

N_ROWS = 10_000_000
N_CLASSES = 100
ROW_GROUP = 1_000_000
SEED = 0
BYTES_PER_VALUE = 4.1  # float32 logits do not compress; a little for label and split
DISK_MARGIN = 2 * 1024**3  # leave this much free after writing


def write_table(path: Path, rows: int, classes: int, row_group: int) -> None:
    """Write the table group by group; only one group is ever in memory."""
    rng = np.random.default_rng(SEED)
    names = [f"logit_{j}" for j in range(classes)]
    schema = pa.schema([("label", pa.int64()), ("split", pa.string())]
                       + [(n, pa.float32()) for n in names])
    splits = pa.array(["train", "unlabelled", "test"])
    with pq.ParquetWriter(str(path), schema) as writer:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            labels = rng.integers(0, classes, size=n)
            logits = rng.standard_normal((n, classes), dtype=np.float32)
            logits[np.arange(n), labels] += 2.5
            which = rng.choice(3, size=n, p=[0.6, 0.2, 0.2])
            label_col = pa.array(labels, mask=which == 1)  # unlabelled rows have no label
            columns = [label_col, splits.take(pa.array(which))]
            columns += [pa.array(logits[:, j]) for j in range(classes)]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema), row_group_size=n)
            del logits, columns


def _baseline(path: str) -> tuple[float, float, float, float]:
    """One plain read pass over the contract's columns: (seconds, rss before, peak, rows)."""
    before = rss_mb()
    start = time.perf_counter()
    pf = pq.ParquetFile(path, pre_buffer=False)
    rows = 0
    for batch in pf.iter_batches(batch_size=160_000, columns=pf.schema_arrow.names):
        rows += batch.num_rows
    seconds = time.perf_counter() - start
    return seconds, before, peak_rss_mb(), rows


def _stream(path: str) -> tuple[float, float, float, dict]:
    from kdcore.analysis.analyzer import analyze_stream

    before = rss_mb()
    start = time.perf_counter()
    doc = analyze_stream(path)
    seconds = time.perf_counter() - start
    return seconds, before, peak_rss_mb(), doc


def in_fresh_process(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=N_ROWS)
    parser.add_argument("--classes", type=int, default=N_CLASSES)
    parser.add_argument("--row-group", type=int, default=ROW_GROUP)
    parser.add_argument("--dir", help="parent folder for the temporary file (default: $TMPDIR)")
    args = parser.parse_args()

    rows, classes = args.rows, args.classes
    folder = Path(tempfile.mkdtemp(prefix="kdcore-bench-", dir=args.dir))
    try:
        free = shutil.disk_usage(folder).free
        need = rows * classes * BYTES_PER_VALUE
        if need + DISK_MARGIN > free:
            fit = int(max(0, free - DISK_MARGIN) / (classes * BYTES_PER_VALUE))
            fit = fit // args.row_group * args.row_group
            if fit < args.row_group:
                raise SystemExit(f"only {free / 1e9:.1f} GB free in {folder}: not enough for "
                                 "one row group; pass --dir with more space")
            print(f"NOTE: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed for {rows:,} "
                  f"rows: scaled down to {fit:,} rows")
            rows = fit
        path = folder / "predictions.parquet"
        start = time.perf_counter()
        write_table(path, rows, classes, args.row_group)
        size = path.stat().st_size
        print(f"wrote {rows:,} x {classes} float32 logits (+ label, split) in row groups of "
              f"{args.row_group:,}: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")
        logits_mb = rows * classes * 4 / 1024**2
        print(f"the logits alone would take {logits_mb:,.0f} MB in memory\n")

        reads, streams = [], []
        for _ in range(2):  # alternately, so neither pass gets the quieter spell of the machine
            reads.append(in_fresh_process(_baseline, str(path)))
            streams.append(in_fresh_process(_stream, str(path)))
        t_read, read_before, read_peak, read_rows = min(reads)
        t_stream, before, peak, doc = min(streams, key=lambda result: result[0])
        assert read_rows == rows
        assert doc["n_samples"] == sum(s["n_samples"] for n, s in doc["splits"].items()
                                       if n != "unlabelled")

        print(f"{'pass (faster of 2)':<36}{'seconds':>9}{'rows/s':>14}{'peak RSS':>11}"
              f"{'growth':>9}")
        print(f"{'plain pyarrow read (iter_batches)':<36}{t_read:9.1f}{rows / t_read:14,.0f}"
              f"{read_peak:9.0f}MB{read_peak - read_before:7.0f}MB")
        print(f"{'kdcore analyze_stream':<36}{t_stream:9.1f}{rows / t_stream:14,.0f}"
              f"{peak:9.0f}MB{peak - before:7.0f}MB")
        print(f"\nanalyze_stream / plain read = {t_stream / t_read:.1f}x the time "
              f"(passes: read {', '.join(f'{r[0]:.1f}' for r in reads)} s; analyze "
              f"{', '.join(f'{r[0]:.1f}' for r in streams)} s); its RSS growth is "
              f"{(peak - before) / logits_mb:.0%} of the logits' size")
        parts = ", ".join(f"{k} {v['n_samples']:,}" for k, v in doc["splits"].items())
        print(f"teacher accuracy {doc['teacher_accuracy']:.4f} on {doc['n_samples']:,} labelled "
              f"rows; splits: {parts}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"deleted {folder}")


if __name__ == "__main__":
    main()
