"""Rebuild the bundled sample `digits_vendor/` deterministically from scikit-learn's digits.

The "vendor teacher" story: a vendor labelled our image pool cheaply, with systematic
confusions (45% of 4s marked 9, 45% of 7s marked 1), and trained a big MLP on it, so the
teacher is genuinely wrong where the vendor was. We verified a stratified 5% of the pool by
hand: that is the labelled distillation set. The rest of the pool is unlabelled transfer data.
The 30% test split is clean and held out.

    python sample_data/build_digits_vendor.py [--out DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from kdcore.learning.models import build_model
from kdcore.learning.train import TrainConfig, fit

NOISE = {4: (9, 0.45), 7: (1, 0.45)}  # true class -> (vendor's label, share relabelled)
TEACHER = {"type": "mlp", "input_dim": 64, "hidden": [512, 512], "n_classes": 10}
STUDENT = {"type": "mlp", "input_dim": 64, "hidden": [32], "n_classes": 10}
TRAINING_DEFAULTS = {
    "epochs": 80,
    "batch_size": 64,
    "unlabelled_batch_size": 64,
    "optimizer": "adam",
    "lr": 3e-3,
    "lr_schedule": "cosine",
    "weight_decay": 0.0,
    "temperature": 4.0,
    "lam": 0.5,
}


def vendor_labels(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Relabel a seeded share of some classes, as a careless labelling vendor would."""
    noisy = y.copy()
    for true_class, (wrong_class, share) in NOISE.items():
        idx = np.flatnonzero(y == true_class)
        flip = rng.choice(idx, size=int(round(share * len(idx))), replace=False)
        noisy[flip] = wrong_class
    return noisy


def train_teacher(x: np.ndarray, y: np.ndarray, *, seed: int, epochs: int = 150) -> torch.nn.Module:
    """Adam 1e-3, batch 64, no augmentation: the vendor's recipe, on kdcore's own training loop."""
    torch.manual_seed(seed)
    model = build_model(TEACHER)
    config = TrainConfig(strategy="ce", seed=seed, epochs=epochs, batch_size=64, lr=1e-3,
                         lr_schedule="constant")
    fit(model, config, x_train=x, y_train=y)
    return model.eval()


def build(out: Path, *, seed: int = 0, teacher_epochs: int = 150) -> dict:
    """Write the bundle to `out` and return its manifest."""
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # the same result on every machine size, and no oversubscription
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_pool, x_test, y_pool, y_test = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=seed
    )
    rng = np.random.default_rng(seed)
    y_vendor = vendor_labels(y_pool, rng)
    teacher = train_teacher(x_pool, y_vendor, seed=seed, epochs=teacher_epochs)

    verified, unverified = train_test_split(
        np.arange(len(y_pool)), train_size=0.05, stratify=y_pool, random_state=seed
    )
    verified.sort()
    unverified.sort()
    with torch.no_grad():
        logits = {
            name: teacher(torch.from_numpy(arr)).numpy().astype(np.float32)
            for name, arr in {
                "train": x_pool[verified],
                "unlabelled": x_pool[unverified],
                "test": x_test,
            }.items()
        }

    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out / "data.npz",
        x_train=x_pool[verified],
        y_train=y_pool[verified],
        x_unlabelled=x_pool[unverified],
        x_test=x_test,
        y_test=y_test,
        teacher_logits_train=logits["train"],
        teacher_logits_unlabelled=logits["unlabelled"],
        teacher_logits_test=logits["test"],
    )
    # The true labels of the transfer data: for analysis only, never used to train a student.
    np.savez_compressed(
        out / "analysis_only_labels.npz",
        y_unlabelled_true=y_pool[unverified],
        y_unlabelled_vendor=y_vendor[unverified],
    )
    torch.save(teacher.state_dict(), out / "teacher.pt")
    test_acc = float((logits["test"].argmax(1) == y_test).mean())
    manifest = {
        "format": "kdcore-bundle/1",
        "name": "digits_vendor",
        "description": (
            "scikit-learn digits (8x8 images). A vendor mislabelled 45% of 4s as 9 and 45% of "
            "7s as 1 and trained the teacher on those labels; 5% of the pool was verified by "
            "hand (train), the rest is unlabelled transfer data; test is clean and held out."
        ),
        "class_names": [str(c) for c in range(10)],
        "input_shape": [64],
        "image_shape": [8, 8],
        "data": "data.npz",
        "analysis_only_labels": "analysis_only_labels.npz",
        "splits": {
            "train": int(len(verified)),
            "unlabelled": int(len(unverified)),
            "test": int(len(y_test)),
        },
        "teacher": {
            "architecture": TEACHER,
            "weights": "teacher.pt",
            "test_accuracy": round(test_acc, 6),
        },
        "student": {"architecture": STUDENT},
        "training_defaults": TRAINING_DEFAULTS,
        "build": {"script": "sample_data/build_digits_vendor.py", "seed": seed},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "digits_vendor")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    manifest = build(args.out, seed=args.seed)
    print(f"wrote {args.out}: teacher test accuracy {manifest['teacher']['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
