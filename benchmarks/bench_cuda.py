"""End-to-end check of a CUDA run: train a student on the GPU and compare with the CPU run.

    python benchmarks/bench_cuda.py

Skips (exit 0, one line) where no CUDA device is visible. On a GPU it trains the bundled
sample's student with kd+be+br+dl on CPU, on CUDA and on CUDA with bf16 autocast, in one
process; checks each finishes with finite losses and an accuracy close to the CPU run's, and
prints the times and their ratios.
"""

from __future__ import annotations

import sys
import time

import torch

from kdcore.data.bundles import load_bundle
from kdcore.learning.train import TrainConfig, train_student


def main() -> int:
    if not torch.cuda.is_available():
        print("skipped: no CUDA device visible (torch.cuda.is_available() is False)")
        return 0
    bundle = load_bundle()
    results = {}
    for name, device, amp in (("cpu", "cpu", False), ("cuda", "cuda", False),
                              ("cuda+amp", "cuda", True)):
        config = TrainConfig.for_bundle(bundle, strategy="kd+be+br+dl", seed=0, device=device,
                                        amp=amp)
        start = time.perf_counter()
        _, fit, metrics = train_student(config, bundle)
        results[name] = (time.perf_counter() - start, metrics["test_accuracy"])
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in fit.history), name
    print(f"device: {torch.cuda.get_device_name(0)}")
    cpu_s, cpu_acc = results["cpu"]
    failed = False
    for name, (seconds, acc) in results.items():
        print(f"{name:9s} {seconds:7.2f} s  test accuracy {acc:.4f}  "
              f"(time vs cpu {seconds / cpu_s:.2f}x)")
        if abs(acc - cpu_acc) > 0.03:
            print(f"FAIL: {name} accuracy differs from the CPU run by more than 3 points")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
