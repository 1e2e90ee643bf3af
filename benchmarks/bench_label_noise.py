"""Label errors vs teacher bias: an honest check of the label-error flags and of ``+lq``.

Run: ``python benchmarks/bench_label_noise.py`` (about 2 minutes on 2 cores, CPU only).

On the bundled sample (``digits_vendor``), for each of 5 seeds s = 0..4:

1. Copy the 62 verified labels of the ``train`` split and flip ``NOISE_RATE`` (15%, i.e. 9) of
   them, chosen with ``numpy.random.default_rng(s)``, each to a class drawn uniformly from the
   other nine. The true labels stay known.
2. Run the label-quality assessment (kdcore.analysis.label_quality.assess, cleanlab on 5-fold
   cross-validated probabilities from the inputs) on the noisy labels and measure the
   precision and recall of ``likely_label_error`` against the flipped rows. Flags exist only on
   teacher-wrong rows, so the recall ceiling (flipped rows the teacher disagrees with) is shown.
3. Train the student with ``kd+be+br+dl`` and ``kd+be+br+dl+lq`` (and ``+lq`` with
   ``lq_drop_ce``) on the noisy labels, and the first two on the clean labels, with the
   bundle's default settings (80 epochs, nothing reduced), training seed s, one thread.

Prints the detection figures, test accuracy mean +- std over the seeds, and the paired
difference of each ``+lq`` variant against the same strategy without it, with a 95%
t-interval (kdcore.analysis.metrics.paired_difference). The test split is clean and held out.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from kdcore.analysis.label_quality import assess
from kdcore.analysis.metrics import paired_difference
from kdcore.data.bundles import load_bundle
from kdcore.learning.train import TrainConfig, train_student

NOISE_RATE = 0.15
SEEDS = (0, 1, 2, 3, 4)
BASE = "kd+be+br+dl"
LQ = "kd+be+br+dl+lq"


class Relabelled:
    """The bundle with other ``train`` labels, in memory (the files are not touched)."""

    def __init__(self, bundle, y_train: np.ndarray) -> None:
        self._bundle, self._y_train = bundle, y_train

    def __getattr__(self, name):
        return getattr(self._bundle, name)

    def y(self, split: str):
        return self._y_train if split == "train" else self._bundle.y(split)


def flip_labels(y: np.ndarray, rate: float, seed: int,
                n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``y`` with round(rate * n) labels moved to another class; and the flipped rows."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(y), size=int(round(rate * len(y))), replace=False))
    noisy = y.copy()
    for i in rows:
        noisy[i] = rng.choice([c for c in range(n_classes) if c != y[i]])
    return noisy, rows


def train(bundle, y_train: np.ndarray, strategy: str, seed: int, **options) -> float:
    config = TrainConfig.for_bundle(bundle, strategy=strategy, seed=seed, **options)
    _, _, metrics = train_student(config, Relabelled(bundle, y_train))
    return 100 * metrics["test_accuracy"]


def fmt(values) -> str:
    a = np.asarray(values, float)
    return f"{a.mean():.2f} ± {a.std(ddof=1):.2f}"


def diff(a, b) -> str:
    d = paired_difference(np.asarray(a), np.asarray(b))
    lo, hi = d["ci95"]
    return f"{d['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def main() -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    bundle = load_bundle()
    y = bundle.y("train")
    x, t = bundle.x("train"), bundle.teacher_logits("train")
    k = bundle.n_classes
    print(f"{bundle.name}: {len(y)} verified train labels; flipping {NOISE_RATE:.0%} "
          f"({int(round(NOISE_RATE * len(y)))}) per seed, seeds {list(SEEDS)}")

    clean_lq = assess(y, t, features=x, class_names=bundle.class_names)
    print(f"clean labels: teacher wrong on {int(clean_lq.teacher_wrong.sum())} rows (its "
          f"genuine bias), flagged as label errors: {int(clean_lq.likely_label_error.sum())}")

    det, acc = [], {key: [] for key in ("noisy_base", "noisy_lq", "noisy_lq_drop",
                                        "clean_base", "clean_lq")}
    print("\nseed  flipped  teacher-wrong of flipped  flags  true flags  "
          "genuine-bias rows flagged")
    for s in SEEDS:
        noisy, rows = flip_labels(y, NOISE_RATE, s, k)
        truth = np.zeros(len(y), dtype=bool)
        truth[rows] = True
        lq = assess(noisy, t, features=x, class_names=bundle.class_names)
        flags = lq.likely_label_error
        genuine_bias = (t.argmax(1) != y) & ~truth  # rows the clean teacher gets wrong
        reachable = int((truth & lq.teacher_wrong).sum())
        tp = int((flags & truth).sum())
        det.append((len(rows), reachable, int(flags.sum()), tp))
        print(f"{s:>4}  {len(rows):>7}  {reachable:>24}  {int(flags.sum()):>5}  {tp:>10}  "
              f"{int((flags & genuine_bias).sum()):>25}")
        acc["noisy_base"].append(train(bundle, noisy, BASE, s))
        acc["noisy_lq"].append(train(bundle, noisy, LQ, s))
        acc["noisy_lq_drop"].append(train(bundle, noisy, LQ, s, lq_drop_ce=True))
        acc["clean_base"].append(train(bundle, y, BASE, s))
        acc["clean_lq"].append(train(bundle, y, LQ, s))

    flipped, reachable, flagged, tp = (np.array(c) for c in zip(*det, strict=True))
    precision = tp.sum() / max(flagged.sum(), 1)
    recall = tp.sum() / flipped.sum()
    print(f"\nDetection over {len(SEEDS)} seeds (pooled): precision {precision:.1%} "
          f"({tp.sum()}/{flagged.sum()}), recall {recall:.1%} ({tp.sum()}/{flipped.sum()}); "
          f"recall ceiling (flipped rows the teacher disagrees with) "
          f"{reachable.sum() / flipped.sum():.1%}")
    per_seed_p = [a / b if b else float("nan") for a, b in zip(tp, flagged, strict=True)]
    per_seed_r = tp / flipped
    print(f"per seed: precision {np.nanmean(per_seed_p):.1%} ± {np.nanstd(per_seed_p, ddof=1):.1%}"
          f", recall {per_seed_r.mean():.1%} ± {per_seed_r.std(ddof=1):.1%}")

    print("\nTest accuracy (%), last epoch, mean ± std over seeds; paired difference vs the "
          "same strategy without +lq, 95% t-interval")
    print("| labels | strategy | test accuracy | vs kd+be+br+dl |")
    print("|---|---|---|---|")
    print(f"| 15% flipped | {BASE} | {fmt(acc['noisy_base'])} | |")
    print(f"| 15% flipped | {LQ} | {fmt(acc['noisy_lq'])} | "
          f"{diff(acc['noisy_lq'], acc['noisy_base'])} |")
    print(f"| 15% flipped | {LQ} (lq_drop_ce) | {fmt(acc['noisy_lq_drop'])} | "
          f"{diff(acc['noisy_lq_drop'], acc['noisy_base'])} |")
    print(f"| clean | {BASE} | {fmt(acc['clean_base'])} | |")
    print(f"| clean | {LQ} | {fmt(acc['clean_lq'])} | "
          f"{diff(acc['clean_lq'], acc['clean_base'])} |")
    print(f"\nper seed: {acc}")
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
