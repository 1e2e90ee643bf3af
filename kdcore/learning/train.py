"""One training loop for teachers and students.

    kdcore train [BUNDLE] --strategy kd+be+br+dl --seed 0          # one run, recorded in the store
    python -m kdcore.learning.train [BUNDLE] --strategy kd --seed 1 --json  # the same, as a module

A step draws a batch of labelled rows and, when the bundle has transfer data, a batch of
unlabelled rows; an epoch is one pass over the larger of the two, whatever the strategy, so
every strategy takes the same number of optimiser steps. The teacher's logits are cached in
the bundle (no augmentation), so the teacher never runs during training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from kdcore.data.bundles import Bundle, load_dataset
from kdcore.errors import DataError, KDCoreError
from kdcore.learning.distributed import any_across, gather_rows, rank_and_world, sum_across
from kdcore.learning.losses import UNLABELLED, Strategy, parse_strategy, strategy_loss
from kdcore.learning.models import build_model, count_parameters

if TYPE_CHECKING:
    from kdcore.data.tabular import TabularDataset

    Dataset = Bundle | TabularDataset  # the training interface: a bundle or a tabular file


class Cancelled(KDCoreError):
    """Raised inside the loop when a cancel was requested; the run is marked cancelled."""


@dataclass
class TrainConfig:
    """Everything that determines a run. Stored whole with the run; identical configs are reused."""

    bundle: str = ""
    strategy: str = "kd+be+br+dl"
    normalisation: str = "batch"
    seed: int = 0
    epochs: int = 80
    batch_size: int = 64
    unlabelled_batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    temperature: float = 4.0
    lam: float = 0.5
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup: int = 20
    device: str = "cpu"
    # How to reload a tabular dataset (label_column, teacher_logits, split_column, test_size,
    # split_seed, hidden); empty for a bundle folder. See kdcore.data.bundles.load_dataset.
    data_options: dict = field(default_factory=dict)
    # +lq (label-quality aware): also leave likely label errors out of CE (default: only out
    # of rectification), and the user's verdict overrides in force for the data
    # ({sample_key: "label_error" | "teacher_bias"}, see kdcore.store.overrides).
    lq_drop_ce: bool = False
    label_overrides: dict = field(default_factory=dict)
    # bfloat16 autocast for the student's forward pass on CUDA (the loss stays in float32)
    amp: bool = False

    @classmethod
    def for_bundle(cls, bundle: Dataset, **overrides) -> TrainConfig:
        """The bundle's recommended defaults, then the caller's overrides (None = keep)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in bundle.training_defaults.items() if k in known}
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["bundle"] = str(bundle.path)
        values["data_options"] = dict(getattr(bundle, "data_options", None) or {})
        config = cls(**values)
        config.strategy = config.parsed().name if config.strategy != "btkd" else "btkd"
        if config.strategy == "btkd":
            config.normalisation = "subset"
        return config

    def parsed(self) -> Strategy:
        return parse_strategy(self.strategy, normalisation=self.normalisation)

    def to_dict(self) -> dict:
        """The config as stored with the run. Empty ``data_options`` (a bundle) are left out, so
        a bundle run's config, and the key that finds identical runs, stay as before."""
        values = asdict(self)
        # options at their defaults are left out, so earlier runs' configs keep their keys
        for key in ("data_options", "label_overrides", "lq_drop_ce", "amp"):
            if not values[key]:
                del values[key]
        return values


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    test_logits: np.ndarray | None = None
    best_test_accuracy: float = float("nan")
    best_epoch: int = -1
    seconds: float = 0.0


ProgressFn = Callable[[int, int, dict | None], None]  # (step, total_steps, epoch metrics or None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9,
                               weight_decay=config.weight_decay)
    raise DataError(f"optimizer {config.optimizer!r}: use adam or sgd")


def fit(model: torch.nn.Module, config: TrainConfig, *, x_train: np.ndarray, y_train: np.ndarray,
        teacher_train: np.ndarray | None = None, x_transfer: np.ndarray | None = None,
        teacher_transfer: np.ndarray | None = None, x_test: np.ndarray | None = None,
        y_test: np.ndarray | None = None, suspect_train: np.ndarray | None = None,
        on_progress: ProgressFn | None = None,
        should_cancel: Callable[[], bool] | None = None, progress_every: int = 10) -> FitResult:
    """Train `model` in place with the config's strategy; evaluate on the test split each epoch.

    ``suspect_train`` (bool per labelled row) marks likely label errors for ``+lq``.
    """
    strategy = config.parsed()
    if strategy.distills and teacher_train is None:
        raise DataError(f"strategy {strategy.name} distils, but no teacher outputs were given")
    device = resolve_device(config.device)
    if config.amp and device.type != "cuda":
        raise DataError(f"--amp needs a CUDA device, and this run is on {device.type}; "
                        "drop --amp or use --device cuda")
    rank, world = rank_and_world()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)  # the same global batches on every rank
    model.to(device).train()
    net = model if world == 1 else DistributedDataParallel(model)

    def tensor(a, dtype=torch.float32):
        return None if a is None else torch.as_tensor(a, dtype=dtype, device=device)

    xs, ys, ts = tensor(x_train), tensor(y_train, torch.long), tensor(teacher_train)
    xu, tu = tensor(x_transfer), tensor(teacher_transfer)
    # The teacher is frozen, so its argmax per row is fixed: found once here, not every step.
    tps, tpu = (None if t is None else t.argmax(1) for t in (ts, tu))
    ss = (tensor(suspect_train, torch.bool)
          if strategy.lq and suspect_train is not None else None)
    xt, yt = tensor(x_test), tensor(y_test, torch.long)
    n, nu = len(xs), 0 if xu is None else len(xu)
    bs, bu = min(config.batch_size, n), config.unlabelled_batch_size
    steps_per_epoch = max(math.ceil(n / bs), math.ceil(nu / bu) if nu else 0)
    total = steps_per_epoch * config.epochs
    opt = _make_optimizer(model, config)
    sched = (torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        if config.lr_schedule == "cosine" else None)

    result, step, started = FitResult(), 0, time.perf_counter()
    labelled_order, labelled_pos = torch.randperm(n, generator=gen), 0
    for epoch in range(config.epochs):
        transfer_order = torch.randperm(nu, generator=gen) if nu else None
        loss_sum = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            cancel = should_cancel is not None and should_cancel()
            if any_across(cancel) if world > 1 else cancel:
                raise Cancelled(f"cancelled at step {step} of {total}")
            if labelled_pos >= n:  # a new pass over the labelled rows; the last batch may be short
                labelled_order, labelled_pos = torch.randperm(n, generator=gen), 0
            idx = labelled_order[labelled_pos : labelled_pos + bs].to(device)
            labelled_pos += bs
            inputs, labels = xs[idx], ys[idx]
            teacher = ts[idx] if ts is not None else None
            predicted = tps[idx] if tps is not None else None
            suspect = ss[idx] if ss is not None else None
            if nu and strategy.distills:
                uidx = transfer_order[(i * bu) % nu : (i * bu) % nu + bu].to(device)
                inputs = torch.cat([inputs, xu[uidx]])
                labels = torch.cat([labels, torch.full((len(uidx),), UNLABELLED, device=device)])
                teacher = torch.cat([teacher, tu[uidx]])
                predicted = torch.cat([predicted, tpu[uidx]])
                if suspect is not None:
                    suspect = torch.cat([suspect, torch.zeros(len(uidx), dtype=torch.bool,
                                                              device=device)])
            if world > 1:  # this rank's strided share of the global batch
                inputs, labels, teacher, predicted, suspect = (
                    None if t is None else t[rank::world]
                    for t in (inputs, labels, teacher, predicted, suspect))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.amp):
                logits = net(inputs)
            parts = strategy_loss(
                logits.float(), teacher if teacher is not None else logits.detach(), labels,
                strategy=strategy, epoch=epoch, epochs=config.epochs,
                temperature=config.temperature, lam=config.lam, dkd_alpha=config.dkd_alpha,
                dkd_beta=config.dkd_beta, dkd_warmup=config.dkd_warmup, suspect=suspect,
                drop_ce=config.lq_drop_ce, teacher_predicted=predicted)
            if not torch.isfinite(parts.total):
                raise KDCoreError(f"loss became {float(parts.total)} at epoch {epoch}; lower --lr")
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            loss_sum += parts.total.detach()
            if on_progress is not None and step % progress_every == 0:
                on_progress(step, total, None)
        # the epoch's mean loss, and its parts on the epoch's last batch (read only once)
        keys = ("ce", "right", "rect", "transfer", "n_wrong")
        values = sum_across([float(loss_sum) / steps_per_epoch]
                            + [float(getattr(parts, k)) for k in keys])
        metrics = {"loss": values[0] / world}
        metrics.update({k: v / world for k, v in zip(keys, values[1:], strict=True)})
        metrics["n_wrong"] = values[-1]  # a count: summed over ranks, not averaged
        metrics["b"] = parts.b
        metrics["lr"] = opt.param_groups[0]["lr"]
        if xt is not None:
            local = predict(model, xt[rank::world])
            correct = sum_across([float((local.argmax(1) == yt[rank::world]).sum())])[0]
            acc = correct / len(yt)
            test_logits = gather_rows(local, rank, world)
            metrics["test_accuracy"] = acc
            if acc > result.best_test_accuracy or result.best_epoch < 0:
                result.best_test_accuracy, result.best_epoch = acc, epoch
            result.test_logits = test_logits.cpu().numpy()
        metrics["epoch"] = epoch
        result.history.append(metrics)
        if on_progress is not None:
            on_progress(step, total, metrics)
    result.seconds = time.perf_counter() - started
    return result


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits in eval mode, in chunks; the model is put back in train mode after."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def bias_inheritance(student_pred: np.ndarray, teacher_pred: np.ndarray,
                     labels: np.ndarray) -> float:
    """Of the samples the teacher gets wrong, the share the student gets wrong the same way."""
    teacher_wrong = teacher_pred != labels
    if not teacher_wrong.any():
        return float("nan")
    return float((student_pred[teacher_wrong] == teacher_pred[teacher_wrong]).mean())


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    correct = np.bincount(labels[pred == labels], minlength=len(class_names))
    support = np.bincount(labels, minlength=len(class_names))
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = correct / support
    return {name: (None if support[i] == 0 else float(acc[i]))
            for i, name in enumerate(class_names)}


def evaluate(test_logits: np.ndarray, bundle: Dataset) -> dict:
    """Final metrics of a student against the bundle's test labels and teacher."""
    labels = bundle.y("test")
    pred = test_logits.argmax(1)
    teacher_pred = bundle.teacher_logits("test").argmax(1)
    return {
        "test_accuracy": float((pred == labels).mean()),
        "per_class_accuracy": per_class_accuracy(pred, labels, bundle.class_names),
        "bias_inheritance": bias_inheritance(pred, teacher_pred, labels),
        "teacher_test_accuracy": float((teacher_pred == labels).mean()),
    }


def train_student(config: TrainConfig, bundle: Dataset | None = None, *,
                  on_progress: ProgressFn | None = None,
                  should_cancel: Callable[[], bool] | None = None,
                  ) -> tuple[torch.nn.Module, FitResult, dict]:
    """Train the data's student with the config's strategy; return model, history and metrics.

    ``bundle`` is a bundle or a tabular dataset; by default it is loaded from the config
    (``kdcore.data.bundles.load_dataset(config.bundle, **config.data_options)``).
    """
    bundle = bundle or load_dataset(config.bundle, **config.data_options)
    torch.manual_seed(config.seed)  # the initial weights are part of the seed's run
    model = build_model(bundle.student_spec)
    has_transfer = "unlabelled" in bundle.splits
    suspect, lq_info = None, {}
    if config.parsed().lq:
        suspect, lq_info = likely_label_errors(bundle, config.label_overrides)
    result = fit(
        model, config, x_train=bundle.x("train"), y_train=bundle.y("train"),
        teacher_train=bundle.teacher_logits("train"),
        x_transfer=bundle.x("unlabelled") if has_transfer else None,
        teacher_transfer=bundle.teacher_logits("unlabelled") if has_transfer else None,
        x_test=bundle.x("test"), y_test=bundle.y("test"), suspect_train=suspect,
        on_progress=on_progress, should_cancel=should_cancel)
    metrics = evaluate(result.test_logits, bundle)
    metrics.update(lq_info)
    metrics.update(
        best_test_accuracy=result.best_test_accuracy,
        best_epoch=result.best_epoch,
        student_params=count_parameters(model),
        teacher_params=(None if bundle.teacher_spec is None  # tabular: only its outputs
                        else count_parameters(build_model(bundle.teacher_spec))),
        train_seconds=round(result.seconds, 3),
        world_size=rank_and_world()[1],
    )
    return model, result, metrics


def likely_label_errors(bundle: Dataset, overrides: dict | None = None,
                        ) -> tuple[np.ndarray, dict]:
    """Per labelled training row, whether it is a likely label error (for ``+lq``), and a summary.

    Out-of-sample probabilities are cross-validated on the training inputs (see
    kdcore.analysis.label_quality); the user's overrides win. When the rows cannot be assessed
    nothing is flagged and the summary says why.
    """
    from kdcore.analysis.label_quality import assess
    from kdcore.store.overrides import sample_keys

    y = bundle.y("train")
    ids = bundle.sample_ids("train") if hasattr(bundle, "sample_ids") else None
    lq = assess(y, bundle.teacher_logits("train"), class_names=bundle.class_names,
                features=bundle.x("train"), keys=sample_keys(len(y), "train", ids),
                overrides=overrides)
    info = {"lq_flagged": int(lq.likely_label_error.sum()),
            "lq_teacher_wrong": int(lq.teacher_wrong.sum())}
    if not lq.available:
        info["lq_note"] = lq.reason
    return lq.likely_label_error.copy(), info


def save_artifacts(directory: Path, model: torch.nn.Module, result: FitResult,
                   bundle: Dataset) -> None:
    """Test predictions (npz, no pickle) and the student's state dict."""
    directory.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(directory / "test_predictions.npz", logits=result.test_logits,
                        labels=bundle.y("test"),
                        teacher_logits=bundle.teacher_logits("test"))
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, directory / "student.pt")
