"""What the two training loops share: one optimiser step on a batch, the optimiser and its
schedule, an epoch's metrics, cancelling, and a student's final test metrics.

kdcore.learning.train runs them over a bundle's cached teacher logits, and
kdcore.learning.image_train over image folders with the teacher run on every view.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from kdcore.analysis.metrics import bias_inheritance, per_class_accuracy
from kdcore.errors import DataError, KDCoreError
from kdcore.learning.distributed import any_across, sum_across
from kdcore.learning.losses import LossParts, Method, Strategy, strategy_loss

if TYPE_CHECKING:
    from kdcore.learning.config import TrainConfig


class Cancelled(KDCoreError):
    """Raised inside the loop when a cancel was requested; the run is marked cancelled."""



@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    test_logits: np.ndarray | None = None
    best_test_accuracy: float = float("nan")
    best_epoch: int = -1
    seconds: float = 0.0
    # an image run's test labels and teacher logits (a bundle's are in the bundle)
    test_labels: np.ndarray | None = None
    teacher_test_logits: np.ndarray | None = None


ProgressFn = Callable[[int, int, dict | None], None]  # (step, total_steps, epoch metrics or None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    raise DataError(f"optimizer {config.optimizer!r}: use adam or sgd")


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Cosine decay to 0 over the run's steps; or ``multistep``: the rate times ``lr_decay``
    at each of ``lr_milestones`` (0-based epochs, so milestone 150 decays from the 151st epoch
    on, as mdistiller's ``epoch > 150`` counting from 1); or None for a constant rate."""
    if config.lr_schedule == "multistep":
        per_epoch = max(1, total_steps // config.epochs)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: config.lr_decay ** sum(
            s // per_epoch >= m for m in config.lr_milestones))
    if config.lr_schedule != "cosine":
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))



class Batch(NamedTuple):
    """Rows of one step: inputs, labels (-1 on transfer rows), the teacher's logits and argmax,
    and the likely-label-error flags of ``+lq``; a field a strategy does not use is None."""

    inputs: torch.Tensor
    labels: torch.Tensor
    teacher: torch.Tensor | None
    teacher_argmax: torch.Tensor | None
    suspect: torch.Tensor | None

    def take(self, index: torch.Tensor) -> Batch:
        return Batch(*(None if t is None else t[index] for t in self))

    def join(self, other: Batch) -> Batch:
        """These rows, then ``other``'s."""
        return Batch(*(None if a is None else torch.cat([a, b])
                       for a, b in zip(self, other, strict=True)))

    def share(self, rank: int, world: int) -> Batch:
        """This rank's strided share of a global batch."""
        return Batch(*(None if t is None else t[rank::world] for t in self))



def train_step(net: torch.nn.Module, batch: Batch, config: TrainConfig, *, strategy: Strategy,
               method: Method | None, epoch: int, optimizer: torch.optim.Optimizer,
               schedule: torch.optim.lr_scheduler.LRScheduler | None) -> LossParts:
    """One optimiser step on one batch; returns its loss and the loss's parts."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.amp):
        logits = net(batch.inputs)
    parts = strategy_loss(
        logits.float(), batch.teacher if batch.teacher is not None else logits.detach(),
        batch.labels, strategy=strategy, epoch=epoch, epochs=config.epochs,
        temperature=config.temperature, lam=config.lam, method=method, suspect=batch.suspect,
        drop_ce=config.lq_drop_ce, teacher_predicted=batch.teacher_argmax)
    if not torch.isfinite(parts.total):
        raise KDCoreError(f"loss became {float(parts.total)} at epoch {epoch}; lower --lr")
    optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    optimizer.step()
    if schedule is not None:
        schedule.step()
    return parts


def epoch_metrics(loss_sum: torch.Tensor, steps: int, last: LossParts,
                  optimizer: torch.optim.Optimizer, world: int) -> dict:
    """The epoch's mean loss and, read only once, the parts of its last batch, over all ranks."""
    keys = ("ce", "right", "rect", "transfer", "n_wrong")
    values = sum_across([float(loss_sum) / steps] + [float(getattr(last, k)) for k in keys])
    metrics = {"loss": values[0] / world}
    metrics.update({k: v / world for k, v in zip(keys, values[1:], strict=True)})
    metrics["n_wrong"] = values[-1]  # a count: summed over ranks, not averaged
    metrics["b"] = last.b
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    return metrics



def stop_if_cancelled(should_cancel: Callable[[], bool] | None, world: int, step: int,
                       total: int) -> None:
    """Raise Cancelled once a cancel is requested (on any rank: all ranks stop together)."""
    cancel = should_cancel is not None and should_cancel()
    if any_across(cancel) if world > 1 else cancel:
        raise Cancelled(f"cancelled at step {step} of {total}")



def student_metrics(test_logits: np.ndarray, labels: np.ndarray, teacher_logits: np.ndarray | None,
                 class_names: list[str]) -> dict:
    """Accuracy (overall and per class) and, with a teacher, its accuracy and the share of its
    test errors the student copies; None for those without one."""
    pred = test_logits.argmax(1)
    teacher_pred = None if teacher_logits is None else teacher_logits.argmax(1)
    return {
        "test_accuracy": float((pred == labels).mean()),
        "per_class_accuracy": per_class_accuracy(pred, labels, class_names),
        "bias_inheritance": (None if teacher_pred is None
                             else bias_inheritance(pred, teacher_pred, labels)),
        "teacher_test_accuracy": (None if teacher_pred is None
                                  else float((teacher_pred == labels).mean())),
    }

