"""Bounded memory whatever the input (issue 13, item 2): many classes never cost K x K.

A small CSV with 10,000 classes once took 4.4 GB (dense int64 K x K confusions) and then failed
with MemoryError. It is analysed here in a child process whose peak RSS growth is measured; an
address-space cap makes a regression fail fast instead of exhausting the machine.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from kdcore.analysis.bias import SPARSE_CONFUSION_CLASSES, decompose
from kdcore.value import figures

K, N_ROWS = 10_000, 40

CHILD = """
import json, resource, sys
import cleanlab.filter, cleanlab.rank, sklearn.linear_model  # imported before the baseline
from kdcore.analysis.analyzer import analyze_path

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

with open("/proc/self/status") as fh:
    vm = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))
before = peak_mb()
text = json.dumps(analyze_path(sys.argv[1]))
print(json.dumps({"growth_mb": peak_mb() - before, "doc": json.loads(text)}))
"""


def _write_csv(path, *, n=N_ROWS, k=K, seed=0):
    """``n`` rows of ``k`` classes: every third row mistaken for class c7, half the rows test."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = np.round(rng.standard_normal((n, k)), 1)
    logits[np.arange(n), labels] += 5
    logits[::3, 7] += 9
    lines = ["label,split," + ",".join(f"logit_c{j}" for j in range(k))]
    lines += [f"c{labels[i]},{'test' if i % 2 else 'train'}," + ",".join(map(str, logits[i]))
              for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return labels, logits.argmax(1)


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="reads /proc and ru_maxrss in KiB (Linux)")
def test_ten_thousand_classes_are_analysed_in_bounded_memory(tmp_path):
    path = tmp_path / "k10000.csv"
    labels, predicted = _write_csv(path)
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["growth_mb"] < 500, result["growth_mb"]
    doc = result["doc"]
    assert doc["n_classes"] == K > SPARSE_CONFUSION_CLASSES
    wrong = labels != predicted
    cells, counts = np.unique(np.stack([labels[wrong], predicted[wrong]], 1), axis=0,
                              return_counts=True)
    expected = [[int(t), int(p), int(c)] for (t, p), c in zip(cells, counts, strict=True)]
    assert doc["error_confusion"] == expected and expected
    for name, part in doc["splits"].items():
        rows = np.arange(N_ROWS) % 2 == (name == "test")
        assert sum(c for _, _, c in part["error_confusion"]) == (wrong & rows).sum()
    quality = doc["likely_label_errors"]
    assert quality["available"]  # the test rows are held out
    assert all(len(cell) == 3 and cell[2] > 0 for cell in quality["label_error_confusion"])


@pytest.mark.parametrize("sparse", [False, True])
def test_the_heatmap_of_many_classes_shows_the_most_confused_ones(sparse, monkeypatch):
    from kdcore.analysis import bias

    k = 200
    rng = np.random.default_rng(0)
    labels = rng.integers(0, k, 3000)
    logits = rng.standard_normal((3000, k)).astype(np.float32)
    logits[np.arange(3000), labels] += 3
    logits[labels == 5, 9] += 6  # class 5 is mostly read as 9
    if sparse:
        monkeypatch.setattr(bias, "SPARSE_CONFUSION_CLASSES", 50)
    rep = decompose(labels, logits)
    fig = figures.error_confusion_heatmap(rep.error_confusion, rep.class_names)
    shown = list(fig.data[0].x)
    assert len(shown) == figures.HEATMAP_CLASSES < k
    assert {"5", "9"} <= set(shown)
    assert f"of {k:,}" in fig.layout.title.text
    # a click still names the classes by their index among all classes
    assert [5, 9] in [list(c) for c in fig.data[1].customdata]


def test_label_error_confusion_of_many_classes_is_sparse_cells():
    from kdcore.analysis.label_quality import LabelQuality

    k = 2 * SPARSE_CONFUSION_CLASSES
    labels = np.array([3, 3, 1500, 8, 3])
    teacher = np.array([9, 9, 2, 8, 1999])
    lq = LabelQuality(True, k, [str(i) for i in range(k)], labels, teacher,
                      likely_label_error=np.array([True, True, True, False, True]))
    assert lq.to_dict()["label_error_confusion"] == [[3, 9, 2], [3, 1999, 1], [1500, 2, 1]]
