"""The Teacher bias page on a 1,000,000-row prediction table: first render, and a cached rerun.

    python benchmarks/bench_dashboard.py [--rows 1000000] [--classes 10]

Runs the real page through Streamlit's AppTest (no browser). The baseline, measured in the
same run, is the engine alone: ``kdcore.analysis.analyzer.report`` on the same table, which
is the least work any rendering of the page must do. Figures are ratios against it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from kdcore.analysis.analyzer import report
from kdcore.data.tables import PredictionTable

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "dashboard" / "app_pages" / "teacher_bias.py"
NAME = "big.parquet (uploaded)"


def make_table(rows: int, classes: int) -> PredictionTable:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, rows)
    logits = rng.standard_normal((rows, classes), dtype=np.float32)
    logits[np.arange(rows), labels] += 2.5  # a teacher right about 80% of the time
    return PredictionTable(source="big.parquet", class_names=[str(c) for c in range(classes)],
                           outputs=logits, kind="logits", labels=labels,
                           split=np.full(rows, "test", dtype=object), sample_id=None, extra=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("KDCORE_HOME", tempfile.mkdtemp(prefix="kdcore-bench-"))
    table = make_table(args.rows, args.classes)

    start = time.perf_counter()
    report(table)
    engine = time.perf_counter() - start

    at = AppTest.from_file(str(PAGE), default_timeout=600)
    at.session_state["data_uploads"] = {NAME: table}
    at.session_state["data_upload_tokens"] = {NAME: "bench"}
    at.run()  # the page with the bundled sample selected
    assert not at.exception, at.exception
    at.selectbox(key="bias_source").set_value(NAME)
    start = time.perf_counter()
    at.run()
    cold = time.perf_counter() - start
    assert not at.exception, at.exception
    start = time.perf_counter()
    at.run()
    cached = time.perf_counter() - start
    assert not at.exception, at.exception

    print(f"Teacher bias page, {args.rows:,} rows x {args.classes} classes")
    print(f"engine alone (analysis.report)  {engine:7.3f} s   baseline")
    print(f"page, first render              {cold:7.3f} s   {cold / engine:5.2f}x the engine")
    print(f"page, cached rerun              {cached:7.3f} s   {cached / engine:5.2f}x the engine")


if __name__ == "__main__":
    main()
