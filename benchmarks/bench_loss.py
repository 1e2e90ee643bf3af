"""Training overhead of the bias-aware loss against vanilla KD, measured in the same process.

    python benchmarks/bench_loss.py [--threads N]

Runs as ``kdcore train`` runs each job (``kdcore.store.jobs``): one torch thread by default (on a
2-core machine two threads also make every timing hostage to whatever else runs there), and
glibc told to keep freed memory (``kdcore.learning.allocator``; without it the batch-1024
figures swing from 1.0x to 1.6x between runs, with the allocation history of the process).

1. The loss alone (forward + backward) on the same logits: kd+be+br+dl vs kd. Target <= 1.25x.
   Shown twice: with the teacher's argmax cached, as ``kdcore.learning.train.fit`` runs it (a frozen
   teacher's argmax never changes, so fit finds it once per run), and with the argmax taken
   inside the loss on every call (``strategy_loss`` without ``teacher_predicted``).
2. A whole training step of a CNN student on 32x32x3 inputs, batch 128 (teacher logits and
   argmax cached, as kdcore trains): kd+be+br+dl vs kd. Target <= 1.05x.
3. The other base losses alone (forward + backward), as their public functions, on the same
   logits at B=1024, K=100: ``ls_kd_loss``, ``dist_loss`` and ``rld_loss`` vs ``kd_loss``.
   Target each <= 2x.

The contenders run in interleaved rounds, so a slow spell of this shared machine hits all of
them in the same round. Each ratio is the median over rounds of that round's ratio, with the
range over rounds; times are medians.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import interleaved, ratio  # benchmarks/timing.py, next to this script

from kdcore.learning.allocator import keep_freed_memory
from kdcore.learning.losses import (
    dist_loss,
    kd_loss,
    ls_kd_loss,
    parse_strategy,
    rld_loss,
    strategy_loss,
)
from kdcore.learning.models import cnn

Step = Callable[[], None]


def ratio_text(times: dict[str, list[float]], name: str, baseline: str) -> str:
    """``median [min-max]`` over rounds of ``times[name] / times[baseline]``."""
    mid, lo, hi = ratio(times, name, baseline)
    return f"{mid:.3f}x [{lo:.2f}-{hi:.2f}]"


def median_us(times: dict[str, list[float]], name: str) -> str:
    return f"{statistics.median(times[name]) * 1e6:7.1f} us"


def loss_step(strategy: str, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
              predicted: torch.Tensor | None) -> Step:
    parsed = parse_strategy(strategy)

    def step():
        logits = s.detach().requires_grad_()
        strategy_loss(logits, t, y, strategy=parsed, epoch=3, epochs=10,
                      teacher_predicted=predicted).total.backward()

    return step


def base_step(loss: Callable[[torch.Tensor], torch.Tensor], s: torch.Tensor) -> Step:
    """One public base loss of the student's logits, forward + backward."""
    def step():
        loss(s.detach().requires_grad_()).backward()

    return step


def plain_kd_step(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> Step:
    """Textbook KD + CE with F.kl_div, for reference: what a hand-written training loop does."""
    def step():
        logits = s.detach().requires_grad_()
        log_p = F.log_softmax(logits / 4, 1)
        kd = F.kl_div(log_p, F.softmax(t / 4, 1), reduction="batchmean") * 16
        (0.5 * F.cross_entropy(logits, y) + 0.5 * kd).backward()

    return step


def train_step(strategy: str, model, opt, x, t, y, predicted) -> Step:
    parsed = parse_strategy(strategy)

    def step():
        loss = strategy_loss(model(x), t, y, strategy=parsed, epoch=3, epochs=10,
                             teacher_predicted=predicted).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    torch.set_num_threads(parser.parse_args().threads)
    kept = keep_freed_memory()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"glibc keeps freed memory: {kept}")
    print("loss alone, forward + backward; ratio of kd+be+br+dl to kd (target <= 1.25), "
          "median [range] over 21 rounds")
    for batch, classes in ((128, 10), (128, 100), (1024, 100)):
        s = torch.randn(batch, classes)
        t = torch.randn(batch, classes) * 3
        y = torch.randint(0, classes, (batch,))
        cached = t.argmax(1)
        r = interleaved({
            "kd": loss_step("kd", s, t, y, cached),
            "bias-aware": loss_step("kd+be+br+dl", s, t, y, cached),
            "bias-aware, argmax in loss": loss_step("kd+be+br+dl", s, t, y, None),
            "plain": plain_kd_step(s, t, y),
        }, rounds=21, inner=30)
        print(f"  B={batch:<5} K={classes:<4} kd {median_us(r, 'kd')}  "
              f"kd+be+br+dl {median_us(r, 'bias-aware')}  "
              f"ratio {ratio_text(r, 'bias-aware', 'kd')}  |  argmax in the loss "
              f"{ratio_text(r, 'bias-aware, argmax in loss', 'kd')}  |  kd vs hand-written KD+CE "
              f"{ratio_text(r, 'kd', 'plain')}")

    x = torch.randn(128, 3, 32, 32)
    t = torch.randn(128, 100) * 3
    y = torch.randint(0, 100, (128,))
    model = cnn(in_channels=3, n_classes=100)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    r = interleaved({"kd": train_step("kd", model, opt, x, t, y, t.argmax(1)),
                     "bias-aware": train_step("kd+be+br+dl", model, opt, x, t, y, t.argmax(1))},
                    rounds=9, inner=3)
    print(f"train step, CNN 32x32x3 B=128 K=100: kd {statistics.median(r['kd']) * 1e3:.1f} ms  "
          f"kd+be+br+dl {statistics.median(r['bias-aware']) * 1e3:.1f} ms  "
          f"ratio {ratio_text(r, 'bias-aware', 'kd')} (target <= 1.05)")

    s, t = torch.randn(1024, 100), torch.randn(1024, 100) * 3
    y = torch.randint(0, 100, (1024,))
    r = interleaved({"kd": base_step(lambda z: kd_loss(z, t, 4.0), s),
                     "ls": base_step(lambda z: ls_kd_loss(z, t, 4.0), s),
                     "dist": base_step(lambda z: dist_loss(z, t, tau=4.0), s),
                     "rld": base_step(lambda z: rld_loss(z, t, y), s)}, rounds=21, inner=30)
    print(f"base losses alone, forward + backward, B=1024 K=100 (target each <= 2): kd_loss "
          f"{median_us(r, 'kd')}")
    for name, function in (("ls", "ls_kd_loss"), ("dist", "dist_loss"), ("rld", "rld_loss")):
        print(f"  {function:<10} {median_us(r, name)}  ratio {ratio_text(r, name, 'kd')}")


if __name__ == "__main__":
    main()
