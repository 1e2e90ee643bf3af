"""End-to-end check of a CUDA run: train a student on the GPU and compare with the CPU run.

    python benchmarks/bench_cuda.py

Skips (exit 0, one line) where no CUDA device is visible. On a GPU it trains the bundled
sample's student with kd+be+br+dl on CUDA and on CPU in the same process, checks both finish
with finite losses and close accuracy, and prints the time of each and their ratio.
"""

from __future__ import annotations

import sys
import time

import torch

from kdcore.bundles import load_bundle
from kdcore.train import TrainConfig, train_student


def main() -> int:
    if not torch.cuda.is_available():
        print("skipped: no CUDA device visible (torch.cuda.is_available() is False)")
        return 0
    bundle = load_bundle()
    results = {}
    for device in ("cpu", "cuda"):
        config = TrainConfig.for_bundle(bundle, strategy="kd+be+br+dl", seed=0, device=device)
        start = time.perf_counter()
        _, fit, metrics = train_student(config, bundle)
        results[device] = (time.perf_counter() - start, metrics["test_accuracy"])
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in fit.history), device
    (cpu_s, cpu_acc), (gpu_s, gpu_acc) = results["cpu"], results["cuda"]
    print(f"device: {torch.cuda.get_device_name(0)}")
    print(f"cpu  {cpu_s:7.2f} s  test accuracy {cpu_acc:.4f}")
    print(f"cuda {gpu_s:7.2f} s  test accuracy {gpu_acc:.4f}  (cuda/cpu time {gpu_s / cpu_s:.2f}x)")
    if abs(cpu_acc - gpu_acc) > 0.03:
        print("FAIL: CUDA and CPU accuracy differ by more than 3 points")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
