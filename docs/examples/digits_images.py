"""The image-folder example of the README, end to end on data scikit-learn ships (no download).

Writes scikit-learn's digits as 32x32 grey PNGs in the ImageFolder layout (train/ and test/,
one folder per class) and a small CNN teacher, trained for a few epochs on the train images
and saved as TorchScript: a teacher kdcore loads without its code.

    python docs/examples/digits_images.py OUT_DIR
    kdcore predict OUT_DIR/digits_images --model-file OUT_DIR/teacher.ts --out digits.parquet
    kdcore analyze digits.parquet --split test
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main(out: Path) -> None:
    digits = load_digits()
    pixels = (digits.images / 16.0 * 255).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        pixels, digits.target, test_size=0.3, random_state=0, stratify=digits.target)
    root = out / "digits_images"
    for split, images, labels in (("train", x_train, y_train), ("test", x_test, y_test)):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            path = root / split / f"digit_{label}" / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).resize((32, 32), Image.NEAREST).save(path)

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(4),
        torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))
    x = torch.tensor(np.stack([np.asarray(Image.fromarray(i).resize((32, 32), Image.NEAREST))
                               for i in x_train]) / 255.0, dtype=torch.float32)[:, None]
    y = torch.tensor(y_train)
    optimiser = torch.optim.Adam(teacher.parameters(), 1e-3)
    for _ in range(12):  # short on purpose: a teacher with mistakes to look at
        for start in range(0, len(x), 64):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(teacher(x[start:start + 64]),
                                                     y[start:start + 64])
            loss.backward()
            optimiser.step()
    teacher.eval()
    torch.jit.save(torch.jit.trace(teacher, x[:2]), str(out / "teacher.ts"))
    print(f"wrote {root} and {out / 'teacher.ts'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
