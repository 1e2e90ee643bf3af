"""One training loop for teachers and students on bundles and tabular data.

    kdcore train [BUNDLE] --strategy kd+be+br+dl --seed 0          # one run, recorded in the store
    python -m kdcore.learning.train [BUNDLE] --strategy kd --seed 1 --json  # the same, as a module

A step draws a batch of labelled rows and, when the bundle has transfer data, a batch of
unlabelled rows; an epoch is one pass over the larger of the two, whatever the strategy, so
every strategy takes the same number of optimiser steps. The teacher's logits are cached in
the bundle (no augmentation), so the teacher never runs during training. An image run
(``student_arch`` set) trains in kdcore.learning.image_train instead, the teacher run on every
view; :func:`train_student` sends it there. The run's config is kdcore.learning.config's and
the step both loops take is kdcore.learning.steps'.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from kdcore.data import Dataset, load_dataset
from kdcore.errors import DataError
from kdcore.learning.config import (  # noqa: F401  (moved there; kept importable here)
    CLI_OPTIONS,
    OPTION_RANGES,
    TrainConfig,
    check_data,
    check_options,
)
from kdcore.learning.distributed import gather_rows, rank_and_world, sum_across
from kdcore.learning.image_train import train_images
from kdcore.learning.losses import UNLABELLED
from kdcore.learning.models import build_model, count_parameters, spec_parameters
from kdcore.learning.steps import (  # noqa: F401  (moved there; kept importable here)
    Batch,
    Cancelled,
    FitResult,
    ProgressFn,
    epoch_metrics,
    make_optimizer,
    make_schedule,
    resolve_device,
    stop_if_cancelled,
    student_metrics,
    train_step,
)


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



def evaluate(model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, rank: int,
             world: int) -> tuple[float, np.ndarray]:
    """Test accuracy and every test row's logits; each rank predicts its strided share."""
    local = predict(model, x_test[rank::world])
    correct = sum_across([float((local.argmax(1) == y_test[rank::world]).sum())])[0]
    return correct / len(y_test), gather_rows(local, rank, world).cpu().numpy()



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
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config, total)
    method = config.method()

    result, step, started = FitResult(), 0, time.perf_counter()
    for epoch in range(config.epochs):
        loss_sum = torch.zeros((), device=device)
        for batch in batches.epoch():
            stop_if_cancelled(should_cancel, world, step, total)
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
    return student_metrics(test_logits, bundle.y("test"), bundle.teacher_logits("test"),
                        bundle.class_names)



def train_student(config: TrainConfig, bundle: Dataset | None = None, *,
                  on_progress: ProgressFn | None = None,
                  should_cancel: Callable[[], bool] | None = None,
                  ) -> tuple[torch.nn.Module, FitResult, dict]:
    """Train the data's student with the config's strategy; return model, history and metrics.

    ``bundle`` is a bundle or a tabular dataset; by default it is loaded from the config
    (``kdcore.data.bundles.load_dataset(config.bundle, **config.data_options)``). An image run
    (``config.student_arch``) trains with :func:`kdcore.learning.image_train.train_images`.
    """
    if config.student_arch:
        return train_images(config, on_progress=on_progress, should_cancel=should_cancel)
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
                   bundle: Dataset | None) -> None:
    """Test predictions (npz, no pickle) and the student's state dict. Without ``bundle`` (an
    image run) the labels and the teacher's logits are the result's; a run without a teacher
    saves no teacher_logits."""
    directory.mkdir(parents=True, exist_ok=True)
    labels, teacher = ((bundle.y("test"), bundle.teacher_logits("test")) if bundle is not None
                       else (result.test_labels, result.teacher_test_logits))
    arrays = {"logits": result.test_logits, "labels": labels}
    if teacher is not None:
        arrays["teacher_logits"] = teacher
    np.savez_compressed(directory / "test_predictions.npz", **arrays)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, directory / "student.pt")
