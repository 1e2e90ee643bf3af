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
import numbers
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from kdcore.analysis.metrics import bias_inheritance, per_class_accuracy
from kdcore.data import Dataset, load_dataset
from kdcore.errors import DataError, KDCoreError
from kdcore.learning.distributed import any_across, gather_rows, rank_and_world, sum_across
from kdcore.learning.losses import (
    UNLABELLED,
    LossParts,
    Method,
    Strategy,
    method_for,
    parse_strategy,
    strategy_loss,
)
from kdcore.learning.models import build_model, check_io, count_parameters, spec_parameters
from kdcore.learning.teachers import check_teacher


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
    # The base loss's own options (e.g. dkd's alpha, beta, warmup; see losses.METHODS), filled
    # with the method's defaults; empty for ce and kd, which have none.
    method_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_options({f.name: getattr(self, f.name) for f in fields(self)})
        method = self.method()
        self.method_options = {} if method is None else asdict(method)

    @classmethod
    def for_bundle(cls, bundle: Dataset, **overrides) -> TrainConfig:
        """The bundle's recommended defaults, then the caller's overrides (None = keep).

        Every run is planned here, so this is where bad input is refused, before anything is
        stored: the options (:func:`check_options`) and the data (:func:`check_data`).
        """
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in bundle.training_defaults.items() if k in known}
        check_options(values, where=f"{_manifest(bundle)}: training_defaults: ")
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["bundle"] = str(bundle.path)
        values["data_options"] = dict(bundle.data_options)
        config = cls(**values)
        config.strategy = config.parsed().name if config.strategy != "btkd" else "btkd"
        if config.strategy == "btkd":
            config.normalisation = "subset"
        check_data(bundle)
        return config

    def parsed(self) -> Strategy:
        return parse_strategy(self.strategy, normalisation=self.normalisation)

    def method(self) -> Method | None:
        """The base loss with this config's options over its defaults; None for ce."""
        strategy = self.parsed()
        if strategy.distills:
            return method_for(strategy.base, self.method_options)
        if self.method_options:
            raise DataError(f"strategy {self.strategy} trains on labels alone and takes no "
                            f"method options, not {', '.join(self.method_options)}")
        return None

    def to_dict(self) -> dict:
        """The config as stored with the run. Empty ``data_options`` (a bundle) are left out, so
        a bundle run's config, and the key that finds identical runs, stay as before."""
        values = asdict(self)
        # options at their defaults are left out, so earlier runs' configs keep their keys
        for key in ("data_options", "label_overrides", "lq_drop_ce", "amp"):
            if not values[key]:
                del values[key]
        # so are a method's options at their defaults, which keeps kd and dkd runs of equal
        # settings in one comparison (kdcore.store.runs migrates older stores to this shape)
        method = self.method()
        if method is None or method == type(method)():
            del values["method_options"]
        else:
            values["method_options"] = asdict(method)
        return values


def _whole(low: int, high: float = math.inf) -> Callable[[object], bool]:
    return lambda v: (isinstance(v, numbers.Integral) and not isinstance(v, bool)
                      and low <= v <= high)


def _real(low: float, high: float = math.inf, *, open_low: bool = False
          ) -> Callable[[object], bool]:
    return lambda v: (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                      and (v > low if open_low else v >= low) and v <= high)


# option -> (accepts a value, what to give instead)
OPTION_RANGES: dict[str, tuple[Callable[[object], bool], str]] = {
    "epochs": (_whole(1), "a whole number, 1 or more"),
    "batch_size": (_whole(1), "a whole number, 1 or more"),
    "unlabelled_batch_size": (_whole(1), "a whole number, 1 or more"),
    "seed": (_whole(-(2**63), 2**63 - 1), "a whole number of at most 63 bits"),  # torch's
    "lr": (_real(0, open_low=True), "a finite number above 0"),
    "temperature": (_real(0, open_low=True), "a finite number above 0"),
    "lam": (_real(0, 1), "a number from 0 to 1"),
    "weight_decay": (_real(0), "a finite number, 0 or more"),
    "optimizer": (lambda v: v in ("adam", "sgd"), "adam or sgd"),
    "lr_schedule": (lambda v: v in ("cosine", "constant"), "cosine or constant"),
}
CLI_OPTIONS = ("epochs", "batch_size", "lr", "temperature", "lam")


def check_options(values: dict, where: str = "") -> None:
    """A one-line DataError for the first training option out of its range (see
    OPTION_RANGES); options not given are not checked. ``where`` prefixes the message (the
    manifest, for a bundle's training defaults); without it the message names the CLI flag."""
    for name, (accepts, what) in OPTION_RANGES.items():
        if name in values and not accepts(values[name]):
            flag = f" (--{name.replace('_', '-')})" if not where and name in CLI_OPTIONS else ""
            raise DataError(f"{where}{name} = {values[name]!r} is out of range; "
                            f"give {what}{flag}")


def _manifest(data: Dataset) -> Path:
    """The file that describes the data: a bundle's manifest, or the tabular file itself."""
    path = Path(data.path)
    return path / "manifest.json" if path.is_dir() else path


def check_data(data: Dataset) -> int | None:
    """Refuse, with one line, data that could not train: read and check its arrays, then check
    that the student's architecture takes the inputs and gives one logit per class, that it
    fits in memory, and that the teacher's weights fit the teacher's (without building it; see
    kdcore.learning.teachers). Returns the teacher's parameter count (None: only its outputs are
    known). Nothing is built, so this is cheap to call for every planned run."""
    rows, n_classes = data.x("train").shape[1:], data.n_classes  # a bundle checks every array
    where = _manifest(data)
    for role, spec in (("student", data.student_spec), ("teacher", data.teacher_spec)):
        if spec is None:
            continue
        try:
            check_io(spec, rows, n_classes)
        except DataError as exc:
            raise DataError(f"{where}: {role}.architecture: {exc}") from None
    needed = 4 * 4 * spec_parameters(data.student_spec)  # weights, gradients, two Adam moments
    if needed > _memory_bytes():
        raise DataError(f"{where}: student.architecture needs {needed / 2**30:,.0f} GiB to "
                        "train, more than this machine has; give it fewer or smaller layers")
    return check_teacher(data)


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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


def _make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Cosine decay to 0 over the run's steps, or None for a constant rate."""
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


def _on(device: torch.device, array: np.ndarray | None,
        dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    return None if array is None else torch.as_tensor(array, dtype=dtype, device=device)


def _rows(device: torch.device, inputs: np.ndarray, labels: np.ndarray | None,
          teacher: np.ndarray | None, suspect: np.ndarray | None) -> Batch:
    """All rows of a split on the device; labels None: transfer rows, unlabelled (-1)."""
    x = _on(device, inputs)
    y = (torch.full((len(x),), UNLABELLED, dtype=torch.long, device=device) if labels is None
         else _on(device, labels, torch.long))
    logits = _on(device, teacher)
    # The teacher is frozen, so its argmax per row is fixed: found once here, not every step.
    argmax = None if logits is None else logits.argmax(1)
    return Batch(x, y, logits, argmax, _on(device, suspect, torch.bool))


class Batches:
    """The seeded batches of a run, the same on every rank.

    Each step takes the next ``batch_size`` labelled rows of a permutation (a new one when a
    pass ends; the last batch of a pass may be short) and, when the strategy distils and there
    are transfer rows, ``transfer_batch_size`` rows of this epoch's permutation of those after
    them. An epoch is one pass over the larger of the two, whatever the strategy, so every
    strategy takes the same steps and draws the same permutations for a seed.
    """

    def __init__(self, labelled: Batch, transfer: Batch | None, *, batch_size: int,
                 transfer_batch_size: int, mix_transfer: bool, generator: torch.Generator):
        self.labelled, self.transfer, self.generator = labelled, transfer, generator
        self.n_labelled = len(labelled.inputs)
        self.n_transfer = 0 if transfer is None else len(transfer.inputs)
        self.batch_size = min(batch_size, self.n_labelled)
        self.transfer_batch_size = transfer_batch_size
        self.mix_transfer = mix_transfer and self.n_transfer > 0
        self.steps_per_epoch = max(
            math.ceil(self.n_labelled / self.batch_size),
            math.ceil(self.n_transfer / transfer_batch_size) if self.n_transfer else 0)
        self._order = torch.randperm(self.n_labelled, generator=generator)
        self._next = 0  # position in ``_order`` of the next labelled row

    def epoch(self) -> Iterator[Batch]:
        """The batches of one epoch; this epoch's order of the transfer rows is drawn first."""
        transfer_order = (torch.randperm(self.n_transfer, generator=self.generator)
                          if self.n_transfer else None)
        device = self.labelled.inputs.device
        for step in range(self.steps_per_epoch):
            if self._next >= self.n_labelled:
                self._order, self._next = torch.randperm(self.n_labelled,
                                                         generator=self.generator), 0
            rows = self._order[self._next : self._next + self.batch_size]
            self._next += self.batch_size
            batch = self.labelled.take(rows.to(device))
            if self.mix_transfer:
                start = (step * self.transfer_batch_size) % self.n_transfer
                rows = transfer_order[start : start + self.transfer_batch_size]
                batch = batch.join(self.transfer.take(rows.to(device)))
            yield batch


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


def evaluate(model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, rank: int,
             world: int) -> tuple[float, np.ndarray]:
    """Test accuracy and every test row's logits; each rank predicts its strided share."""
    local = predict(model, x_test[rank::world])
    correct = sum_across([float((local.argmax(1) == y_test[rank::world]).sum())])[0]
    return correct / len(y_test), gather_rows(local, rank, world).cpu().numpy()


def _stop_if_cancelled(should_cancel: Callable[[], bool] | None, world: int, step: int,
                       total: int) -> None:
    """Raise Cancelled once a cancel is requested (on any rank: all ranks stop together)."""
    cancel = should_cancel is not None and should_cancel()
    if any_across(cancel) if world > 1 else cancel:
        raise Cancelled(f"cancelled at step {step} of {total}")


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
    order = torch.Generator().manual_seed(config.seed)  # the same global batches on every rank
    model.to(device).train()
    net = model if world == 1 else DistributedDataParallel(model)

    suspect = suspect_train if strategy.lq else None
    labelled = _rows(device, x_train, y_train, teacher_train, suspect)
    transfer = None if x_transfer is None else _rows(
        device, x_transfer, None, teacher_transfer,
        None if suspect is None else np.zeros(len(x_transfer), dtype=bool))
    batches = Batches(labelled, transfer, batch_size=config.batch_size,
                      transfer_batch_size=config.unlabelled_batch_size,
                      mix_transfer=strategy.distills, generator=order)
    x_test_rows, y_test_rows = _on(device, x_test), _on(device, y_test, torch.long)
    total = batches.steps_per_epoch * config.epochs
    optimizer = _make_optimizer(model, config)
    schedule = _make_schedule(optimizer, config, total)
    method = config.method()

    result, step, started = FitResult(), 0, time.perf_counter()
    for epoch in range(config.epochs):
        loss_sum = torch.zeros((), device=device)
        for batch in batches.epoch():
            _stop_if_cancelled(should_cancel, world, step, total)
            parts = train_step(net, batch if world == 1 else batch.share(rank, world), config,
                               strategy=strategy, method=method, epoch=epoch,
                               optimizer=optimizer, schedule=schedule)
            step += 1
            loss_sum += parts.total.detach()
            if on_progress is not None and step % progress_every == 0:
                on_progress(step, total, None)
        metrics = epoch_metrics(loss_sum, batches.steps_per_epoch, parts, optimizer, world)
        if x_test_rows is not None:
            accuracy, result.test_logits = evaluate(model, x_test_rows, y_test_rows, rank, world)
            metrics["test_accuracy"] = accuracy
            if accuracy > result.best_test_accuracy or result.best_epoch < 0:
                result.best_test_accuracy, result.best_epoch = accuracy, epoch
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


def final_metrics(test_logits: np.ndarray, bundle: Dataset) -> dict:
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
    metrics = final_metrics(result.test_logits, bundle)
    metrics.update(lq_info)
    metrics.update(
        best_test_accuracy=result.best_test_accuracy,
        best_epoch=result.best_epoch,
        student_params=count_parameters(model),
        teacher_params=(None if bundle.teacher_spec is None  # tabular: only its outputs
                        else spec_parameters(bundle.teacher_spec)),
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
    from kdcore.analysis.label_quality import assess, sample_keys

    y = bundle.y("train")
    ids = bundle.sample_ids("train")
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
