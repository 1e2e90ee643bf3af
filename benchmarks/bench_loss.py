"""Training overhead of the bias-aware loss against vanilla KD, measured in the same process.

    python benchmarks/bench_loss.py

1. The loss alone (forward + backward) on the same logits: kd+be+br+dl vs kd. Target <= 1.25x.
2. A whole training step of a CNN student on 32x32x3 inputs, batch 128 (teacher logits
   cached, as kdcore trains): kd+be+br+dl vs kd. Target <= 1.05x.
Timings are the median of interleaved repeats, so drift on a noisy machine hits both sides.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from kdcore.losses import parse_strategy, strategy_loss
from kdcore.models import cnn


def interleaved(fns: dict, repeats: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each function, alternating between them."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def loss_step(strategy: str, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    parsed = parse_strategy(strategy)

    def step():
        logits = s.detach().requires_grad_()
        strategy_loss(logits, t, y, strategy=parsed, epoch=3, epochs=10).total.backward()

    return step


def plain_kd_step(s, t, y):
    def step():
        logits = s.detach().requires_grad_()
        log_p = F.log_softmax(logits / 4, 1)
        kd = F.kl_div(log_p, F.softmax(t / 4, 1), reduction="batchmean") * 16
        (0.5 * F.cross_entropy(logits, y) + 0.5 * kd).backward()

    return step


def train_step(strategy: str, model, opt, x, t, y):
    parsed = parse_strategy(strategy)

    def step():
        loss = strategy_loss(model(x), t, y, strategy=parsed, epoch=3, epochs=10).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for batch, classes in ((128, 10), (128, 100), (1024, 100)):
        s = torch.randn(batch, classes)
        t = torch.randn(batch, classes) * 3
        y = torch.randint(0, classes, (batch,))
        r = interleaved({"plain": plain_kd_step(s, t, y), "kd": loss_step("kd", s, t, y),
                         "bias-aware": loss_step("kd+be+br+dl", s, t, y)}, repeats=15, inner=50)
        print(f"loss alone  B={batch:<5} K={classes:<4} plain KD+CE {r['plain'] * 1e6:7.1f} us  "
              f"kd {r['kd'] * 1e6:7.1f} us  kd+be+br+dl {r['bias-aware'] * 1e6:7.1f} us  "
              f"ratio vs kd {r['bias-aware'] / r['kd']:.3f}x (target <= 1.25)  "
              f"vs plain {r['bias-aware'] / r['plain']:.3f}x")

    x = torch.randn(128, 3, 32, 32)
    t = torch.randn(128, 100) * 3
    y = torch.randint(0, 100, (128,))
    model = cnn(in_channels=3, n_classes=100)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    r = interleaved({"kd": train_step("kd", model, opt, x, t, y),
                     "bias-aware": train_step("kd+be+br+dl", model, opt, x, t, y)},
                    repeats=9, inner=3)
    print(f"train step  CNN 32x32x3 B=128 K=100: kd {r['kd'] * 1e3:.1f} ms  "
          f"kd+be+br+dl {r['bias-aware'] * 1e3:.1f} ms  "
          f"ratio {r['bias-aware'] / r['kd']:.3f}x (target <= 1.05)")


if __name__ == "__main__":
    main()
