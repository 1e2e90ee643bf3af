"""Train a vision student on an image folder or CIFAR folder, its teacher run on every view.

    kdcore train IMAGES --student resnet8x4 --teacher resnet32x4 --teacher-weights t.pth \\
        --strategy kd+be+br+dl --preset cifar                 # mdistiller's CIFAR-100 recipe
    kdcore train IMAGES --student resnet8x4 --teacher-model t.onnx --strategy kd --epochs 5
    kdcore train IMAGES --student resnet32x4 --strategy ce    # no teacher: make one
    kdcore train --resume RUN_ID                              # a killed run, from its checkpoint
    torchrun --nproc-per-node 2 -m kdcore train IMAGES ...    # DDP, or: kdcore train --nproc 2

Bundles cache their teacher's logits; here the teacher is frozen (eval mode, inference_mode)
and runs on the same augmented batch as the student, so the right/wrong split of the
bias-aware parts is taken per view: a crop the teacher gets wrong is rectified (or eliminated)
while its flipped twin that it gets right is distilled as it is (:func:`view_step`).

Images are decoded and augmented in a DataLoader's workers (``loader_workers``). Which images
make each batch, and each image's crop and flip, are drawn up front from a generator seeded
with the run's seed (:class:`ViewBatches`), so a run trains the same with any number of
workers, and every rank draws the same global batch and loads its strided share of it. An
epoch is one pass over the labelled images (or over the transfer images, when a distilling
run has more of those). After each epoch the state is checkpointed (``last.pt``, and
``best.pt`` at the best test accuracy so far), readable with ``torch.load(weights_only=True)``,
and a resumed run goes on from the last one as if it had never stopped.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from kdcore.data.images import to_array
from kdcore.errors import DataError
from kdcore.learning.config import TrainConfig
from kdcore.learning.distributed import gather_rows, rank_and_world, sum_across
from kdcore.learning.image_setup import (  # noqa: F401  (PRESETS: the recipes, named here too)
    PRESETS,
    Setup,
    Teacher,
    example_inputs,
    load_teacher,
    open_setup,
    teacher_logits,
)
from kdcore.learning.losses import UNLABELLED, LossParts, Method, Strategy
from kdcore.learning.models import build_model, count_parameters
from kdcore.learning.steps import (
    Batch,
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

PAD = 4  # the random crop's zero padding, in pixels
CHECKPOINTS = ("last.pt", "best.pt")
EVAL_BATCH = 256  # images per batch when predicting the test split
PROGRESS_SECONDS = 1.0  # at most one progress report a second between epochs


def load_run_models(config: dict | TrainConfig) -> tuple[nn.Module, nn.Module, np.ndarray]:
    """An image run's teacher (a :class:`Teacher` module), its student's untrained skeleton
    (the caller loads the run's ``student.pt``) and a batch of prepared test images, to
    measure both on (kdcore.value.roi)."""
    config = config if isinstance(config, TrainConfig) else TrainConfig(**config)
    if not config.student_arch:
        raise DataError(f"{config.bundle}: not an image run (no student architecture); "
                        "bundle runs build their models from the bundle's manifest")
    setup = open_setup(config)
    teacher = load_teacher(config, setup)
    if teacher is None:
        raise DataError(f"the run on {config.bundle} was trained without a teacher "
                        f"({config.strategy}); there is no teacher to measure")
    student = build_model({"type": config.student_arch, "n_classes": setup.n_classes,
                           "in_channels": setup.channels})
    return teacher, student.eval(), example_inputs(setup)



# --------------------------------------------------------------------------------------------
# Images: decoded, augmented and normalised in the loader's workers


def augment(x: np.ndarray, draw: int, pad: int = PAD) -> np.ndarray:
    """A random crop of ``x`` (C, H, W) at its own size from the image zero-padded by ``pad``,
    flipped horizontally or not, as torchvision's RandomCrop(padding) and RandomHorizontalFlip:
    ``draw`` (0 <= draw < 2 * (2 * pad + 1) ** 2) picks the offsets and the flip."""
    c, h, w = x.shape
    side = 2 * pad + 1
    (dy, dx), flip = divmod(draw % side**2, side), draw // side**2 % 2
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=x.dtype)
    padded[:, pad:pad + h, pad:pad + w] = x
    view = padded[:, dy:dy + h, dx:dx + w]
    return np.ascontiguousarray(view[:, :, ::-1] if flip else view)


DRAWS = 2 * (2 * PAD + 1) ** 2  # the distinct crops and flips of one image


class ImageViews(torch.utils.data.Dataset):
    """One split's images; item ``(index, draw)`` is image ``index`` decoded, augmented by
    ``draw`` (when augmenting) and normalised, with its label (-1 for transfer images)."""

    def __init__(self, setup: Setup, split: str, *, augmented: bool):
        self.setup, self.augmented = setup, augmented
        self.ids = setup.source.sample_ids(split)
        labels = setup.source.labels(split)
        self.labels = np.full(len(self.ids), UNLABELLED) if labels is None else labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, draw = key
        setup = self.setup
        x = to_array(setup.source.load_image(str(self.ids[index])), size=setup.size,
                     channels=setup.channels)
        if self.augmented:
            x = augment(x, draw)
        return torch.from_numpy(setup.preprocess.apply(x[None])[0]), int(self.labels[index])


class ViewBatches:
    """The batches of one split for an epoch of ``steps`` steps: permutations of the images,
    as many as the steps need (one, its last batch short, when they make one pass), and one
    draw per image (its crop and flip), all from ``generator`` when an epoch starts, so the
    same on every rank and with any number of loader workers. Each rank loads its strided
    share of every global batch."""

    def __init__(self, n: int, batch_size: int, steps: int, generator: torch.Generator, *,
                 augmented: bool, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.steps = n, min(batch_size, n), steps
        self.generator, self.augmented, self.rank, self.world = generator, augmented, rank, world

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        one_pass = self.steps == math.ceil(self.n / self.batch_size)
        total = self.n if one_pass else self.steps * self.batch_size
        order = torch.cat([torch.randperm(self.n, generator=self.generator)
                           for _ in range(math.ceil(total / self.n))])[:total]
        draws = (torch.randint(0, DRAWS, (total,), generator=self.generator) if self.augmented
                 else torch.zeros(total, dtype=torch.long))
        for step in range(self.steps):
            rows = slice(step * self.batch_size, (step + 1) * self.batch_size)
            share = slice(self.rank, None, self.world)
            yield list(zip(order[rows][share].tolist(), draws[rows][share].tolist(),
                           strict=True))


def _loader(views: ImageViews, batches, workers: int, device: torch.device) -> DataLoader:
    """Batches of ``views`` decoded in ``workers`` processes (kept for the whole run), pinned
    on CUDA. Its own generator: the loader's draw of a worker seed never touches torch's
    global one (the workers draw nothing)."""
    return DataLoader(views, batch_sampler=batches, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      generator=torch.Generator())


def _test_batches(n: int, rank: int, world: int) -> list[list[tuple[int, int]]]:
    """This rank's strided share of the test images (``full[rank::world]``), in order."""
    mine = list(range(rank, n, world))
    return [[(i, 0) for i in mine[s:s + EVAL_BATCH]] for s in range(0, len(mine), EVAL_BATCH)]


@torch.inference_mode()
def _predict(model: nn.Module, loader: DataLoader, device: torch.device) -> torch.Tensor:
    """Logits (on the CPU) of every batch of ``loader``; a student is put in eval mode and
    back in train mode after."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x.to(device, non_blocking=True)).float().cpu() for x, _ in loader])
    model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# The loop


def view_step(net: nn.Module, teacher: Teacher | None, inputs: torch.Tensor,
              labels: torch.Tensor, config: TrainConfig, *, strategy: Strategy,
              method: Method | None, epoch: int, optimizer: torch.optim.Optimizer,
              schedule: torch.optim.lr_scheduler.LRScheduler | None) -> LossParts:
    """One optimiser step on a batch of views with the teacher's logits of these very views:
    its right/wrong split, and so which rows BR rectifies and BE drops, is this batch's."""
    logits = None if teacher is None or not strategy.distills else teacher_logits(
        teacher, inputs, amp=config.amp)
    return train_step(net, Batch(inputs, labels, logits, None, None), config,
                      strategy=strategy, method=method, epoch=epoch, optimizer=optimizer,
                      schedule=schedule)


def train_images(config: TrainConfig, *, on_progress: ProgressFn | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 checkpoint_dir: str | Path | None = None, resume: bool = False,
                 ) -> tuple[nn.Module, FitResult, dict]:
    """Train the config's student on its image source; the same model, history and metrics as
    :func:`kdcore.learning.train.train_student`. With ``checkpoint_dir`` the state is saved
    there after every epoch (rank 0); ``resume`` goes on from its ``last.pt``."""
    strategy, method = config.parsed(), config.method()
    setup = open_setup(config)
    device = resolve_device(config.device)
    if config.amp and device.type != "cuda":
        raise DataError(f"--amp needs a CUDA device, and this run is on {device.type}; "
                        "drop --amp or use --device cuda")
    rank, world = rank_and_world()
    torch.manual_seed(config.seed)  # the initial weights are part of the seed's run
    student = build_model({"type": config.student_arch, "n_classes": setup.n_classes,
                           "in_channels": setup.channels})
    teacher = load_teacher(config, setup)
    if strategy.distills and teacher is None:
        raise DataError(f"strategy {strategy.name} distils, but the config names no teacher")
    if teacher is not None:
        teacher.to(device)
    student.to(device).train()
    net = student if world == 1 else DistributedDataParallel(student)

    order = torch.Generator().manual_seed(config.seed)
    source, workers = setup.source, config.loader_workers
    transfer = strategy.distills and "unlabelled" in source.splits
    steps = max(math.ceil(source.n("train") / config.batch_size),
                math.ceil(source.n("unlabelled") / config.unlabelled_batch_size)
                if transfer else 0)
    train = _loader(ImageViews(setup, "train", augmented=config.augment), ViewBatches(
        source.n("train"), config.batch_size, steps, order, augmented=config.augment,
        rank=rank, world=world), workers, device)
    extra = None if not transfer else _loader(
        ImageViews(setup, "unlabelled", augmented=config.augment), ViewBatches(
            source.n("unlabelled"), config.unlabelled_batch_size, steps, order,
            augmented=config.augment, rank=rank, world=world), workers, device)
    test = _loader(ImageViews(setup, "test", augmented=False),
                   _test_batches(source.n("test"), rank, world), workers, device)
    labels = source.labels("test")
    total = steps * config.epochs
    optimizer = make_optimizer(student, config)
    schedule = make_schedule(optimizer, config, total)

    result = FitResult(test_labels=labels)
    if teacher is not None:
        result.teacher_test_logits = gather_rows(_predict(teacher, test, device),
                                                 rank, world).numpy()
    first, step, before = 0, 0, 0.0
    folder = None if checkpoint_dir is None else Path(checkpoint_dir)
    if resume:
        first, step, before = _restore(folder, student, optimizer, schedule, order, result)
    started = last_report = time.perf_counter()
    for epoch in range(first, config.epochs):
        loss_sum = torch.zeros((), device=device)
        for (x, y), more in zip(train, extra if extra is not None else repeat(None),
                                strict=False):
            stop_if_cancelled(should_cancel, world, step, total)
            if more is not None:
                x, y = torch.cat([x, more[0]]), torch.cat([y, more[1]])
            parts = view_step(net, teacher, x.to(device, non_blocking=True),
                              y.to(device, non_blocking=True), config, strategy=strategy,
                              method=method, epoch=epoch, optimizer=optimizer,
                              schedule=schedule)
            step += 1
            loss_sum += parts.total.detach()
            if on_progress is not None and time.perf_counter() - last_report > PROGRESS_SECONDS:
                on_progress(step, total, None)
                last_report = time.perf_counter()
        metrics = epoch_metrics(loss_sum, steps, parts, optimizer, world)
        local = _predict(student, test, device)
        correct = sum_across([float((local.argmax(1).numpy() == labels[rank::world]).sum())])
        metrics["test_accuracy"] = accuracy = correct[0] / len(labels)
        result.test_logits = gather_rows(local, rank, world).numpy()
        best = accuracy > result.best_test_accuracy or result.best_epoch < 0
        if best:
            result.best_test_accuracy, result.best_epoch = accuracy, epoch
        metrics["epoch"] = epoch
        result.history.append(metrics)
        result.seconds = before + time.perf_counter() - started
        if on_progress is not None:  # logged first: a kill before the checkpoint redoes it
            on_progress(step, total, metrics)
        if folder is not None and rank == 0:
            _checkpoint(folder, best, student=student, optimizer=optimizer,
                        schedule=schedule, order=order, epoch=epoch, step=step, result=result)
    result.seconds = before + time.perf_counter() - started
    metrics = student_metrics(result.test_logits, labels, result.teacher_test_logits,
                              source.class_names)
    metrics.update(
        best_test_accuracy=result.best_test_accuracy,
        best_epoch=result.best_epoch,
        student_params=count_parameters(student),
        teacher_params=None if teacher is None else teacher.parameter_count,
        train_seconds=round(result.seconds, 3),
        world_size=world,
    )
    return student, result, metrics


# --------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint(folder: Path, best: bool, *, student: nn.Module,
                optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LRScheduler | None,
                order: torch.Generator, epoch: int, step: int, result: FitResult) -> None:
    """Everything a resumed run needs, in ``last.pt`` (written whole, then renamed, so a kill
    mid-write leaves the previous one) and, at a new best test accuracy, in ``best.pt``.
    Tensors, numbers, strings and containers only: ``torch.load(weights_only=True)`` reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    state = {
        "model": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": {} if schedule is None else schedule.state_dict(),
        "epoch": epoch,
        "step": step,
        "rng": {"torch": torch.get_rng_state(), "order": order.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "best_test_accuracy": result.best_test_accuracy,
        "best_epoch": result.best_epoch,
        "history": result.history,
        "test_logits": torch.from_numpy(result.test_logits),
        "seconds": result.seconds,
    }
    last, best_file = (folder / name for name in CHECKPOINTS)
    if not best:
        _replace(folder, last, lambda tmp: torch.save(state, tmp))
        return
    # best first: a kill before last.pt is written redoes this epoch, and writes best again
    _replace(folder, best_file, lambda tmp: torch.save(state, tmp))
    _replace(folder, last, lambda tmp: shutil.copyfile(best_file, tmp))


def _replace(folder: Path, target: Path, write: Callable[[Path], object]) -> None:
    tmp = folder / f".{target.name}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(file: Path) -> dict:
    """A checkpoint, read as weights only (never unpickling code); DataError if unreadable."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{file}: no checkpoint to resume from; the run stopped before its "
                        "first epoch ended, so train it again") from None
    except Exception as exc:  # a damaged file
        raise DataError(f"{file}: cannot read the checkpoint ({type(exc).__name__}); train "
                        "the run again") from None


def _restore(folder: Path | None, student: nn.Module, optimizer: torch.optim.Optimizer,
             schedule: torch.optim.lr_scheduler.LRScheduler | None, order: torch.Generator,
             result: FitResult) -> tuple[int, int, float]:
    """Load ``last.pt`` into the run's objects; returns (first epoch to train, steps taken,
    seconds trained so far)."""
    if folder is None:
        raise DataError("resume needs the run's checkpoint folder")
    state = read_checkpoint(folder / CHECKPOINTS[0])
    student.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if schedule is not None:
        schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"]["torch"])
    order.set_state(state["rng"]["order"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    result.best_test_accuracy, result.best_epoch = state["best_test_accuracy"], state["best_epoch"]
    result.history = list(state["history"])
    result.test_logits = state["test_logits"].numpy()
    return state["epoch"] + 1, state["step"], state["seconds"]
