"""Training a vision student: kdcore's image loop against a minimal hand-written PyTorch KD loop.

Run: ``python benchmarks/bench_images.py`` (``--teacher resnet20 --student resnet8`` for a
quick run; ``--images N``, ``--batch-size B``, ``--threads T``, ``--loader-workers W``). It

1. writes a folder of N random 32x32 RGB PNG images (10 classes; 80% in ``train/``, 20% in
   ``test/``, as CIFAR's 50,000 and 10,000) and the state dict of the teacher (a zoo
   architecture, random weights) into a temporary folder;
2. times, in interleaved rounds, a one-epoch run of
   - kdcore: :func:`kdcore.learning.image_train.train_images` with strategy ``kd`` and the
     cifar preset (the teacher frozen in eval mode, run under ``inference_mode`` on every
     augmented batch, random crop with zero padding 4 and horizontal flip, cifar100
     normalisation, SGD with momentum), opening the folder, loading the teacher, predicting
     the test split and writing the epoch's checkpoint included;
   - a hand-written loop doing the same: a ``Dataset`` that decodes each PNG with Pillow and
     augments it in torch, a ``DataLoader``, the teacher under ``inference_mode`` on the
     augmented batch, ``0.5 * CE + 0.5 * T^2 * KL`` (T = 4), an SGD step, and the test split
     predicted by the teacher (once) and the student (after the epoch);
   with the same models, files, batch size, torch threads and loader workers;
3. prints the images/s of each (best round), the ratio kdcore / hand-written (median over
   rounds, and its range; the target is >= 0.95x on CPU) in wall-clock time and in the
   process's CPU time (steadier on a shared machine: with one thread and no loader workers
   it is the work done, whatever else runs), the device, and the data-loading
   share: the part of the hand-written epoch spent waiting for the next batch, and kdcore's
   loader alone (decode, augment, normalise) against kdcore's epoch;
4. times ``--estimate-steps`` steps of kdcore's loop (:func:`view_step` at the batch size) and
   the student's prediction of a batch, and extrapolates a CIFAR-100 epoch from them (50,000
   training images in batches, 10,000 test images predicted): an estimate, labelled so, by
   the wall clock and in CPU time (what one idle core would take, with one thread).

On CUDA (when one is visible) it says so and adds both contenders with bfloat16 autocast
(``--amp`` in kdcore). Ratios, not absolute targets: the machine's speed varies between spells.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import N_CLASSES, SIDE, make_folder, make_weights  # noqa: E402
from timing import interleaved, ratio  # noqa: E402

from kdcore.learning.allocator import keep_freed_memory  # noqa: E402
from kdcore.learning.models import build_model  # noqa: E402
from kdcore.learning.predict import NORMALIZE_PRESETS  # noqa: E402

PAD = 4
CIFAR100_TRAIN, CIFAR100_TEST = 50_000, 10_000  # images per split
TEMPERATURE = 4.0
LAM = 0.5
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4  # mdistiller's CIFAR recipe
NORMALIZE = "cifar100"


class Folder(torch.utils.data.Dataset):
    """The PNG files of ``root/<split>``: decoded with Pillow, randomly cropped (zero padding,
    as torchvision's RandomCrop) and flipped when ``augment``, then normalised."""

    def __init__(self, root: Path, split: str, *, augment: bool):
        self.classes = sorted(p.name for p in (root / "train").iterdir())
        self.files = [(f, i) for i, c in enumerate(self.classes)
                      for f in sorted((root / split / c).glob("*.png"))]
        self.augment = augment
        mean, std = NORMALIZE_PRESETS[NORMALIZE]
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[index]
        x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        if self.augment:
            h, w = x.shape[1:]
            x = F.pad(x, (PAD, PAD, PAD, PAD))
            top, left = torch.randint(0, 2 * PAD + 1, (2,)).tolist()
            x = x[:, top:top + h, left:left + w]
            if torch.rand(()) < 0.5:
                x = x.flip(2)
        return (x.float() / 255 - self.mean) / self.std, label


def hand_written(root: Path, teacher_arch: str, weights: Path, student_arch: str, *,
                 batch_size: int, workers: int, device: torch.device, amp: bool,
                 seed: int = 0) -> dict:
    """One epoch of a minimal KD loop as one would write it, with the test split predicted as
    kdcore does (the teacher once, the student after the epoch). Returns the images trained
    on, the seconds spent waiting for batches, and the student's and teacher's test
    accuracy."""
    torch.manual_seed(seed)
    data = Folder(root, "train", augment=True)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, num_workers=workers,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))
    test = torch.utils.data.DataLoader(Folder(root, "test", augment=False), batch_size=256,
                                       num_workers=workers)
    teacher = build_model({"type": teacher_arch, "n_classes": len(data.classes)})
    teacher.load_state_dict(torch.load(weights, weights_only=True))
    teacher.to(device).eval()
    student = build_model({"type": student_arch, "n_classes": len(data.classes)}).to(device)
    optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
        teacher_pred = torch.cat([teacher(x.to(device)).argmax(1).cpu() for x, _ in test])
    seen, waiting = 0, 0.0
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        waiting += time.perf_counter() - start
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            with torch.inference_mode():
                z_t = teacher(x)
            z_s = student(x)
        z_t, z_s = z_t.float().clone(), z_s.float()  # an inference tensor cannot join autograd
        kl = F.kl_div(F.log_softmax(z_s / TEMPERATURE, 1), F.log_softmax(z_t / TEMPERATURE, 1),
                      reduction="batchmean", log_target=True)
        loss = LAM * F.cross_entropy(z_s, y) + (1 - LAM) * TEMPERATURE**2 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
    student.eval()
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
        pred = torch.cat([student(x.to(device)).argmax(1).cpu() for x, _ in test])
    labels = torch.tensor([label for _, label in test.dataset.files])
    return {"images": seen, "waiting": waiting,
            "test_accuracy": float((pred == labels).float().mean()),
            "teacher_test_accuracy": float((teacher_pred == labels).float().mean())}


def kdcore_epoch(config, checkpoints: Path) -> dict:
    """One epoch of kdcore's loop, as a job runs it (a checkpoint written at its end)."""
    from kdcore.learning.image_train import train_images

    shutil.rmtree(checkpoints, ignore_errors=True)
    return train_images(config, checkpoint_dir=checkpoints)[2]


def kdcore_setup(config) -> float:
    """CPU seconds of what kdcore does once per run before training: open the folder (every
    image's header read, to refuse bad files before anything is stored) and load the teacher
    and check it on one image."""
    from kdcore.learning.image_train import load_teacher, open_setup

    start = time.process_time()
    load_teacher(config, open_setup(config))
    return time.process_time() - start


def kdcore_loading(config) -> float:
    """Seconds to decode, augment and normalise one epoch of kdcore's batches, nothing else."""
    from kdcore.learning.image_train import ImageViews, ViewBatches, open_setup

    setup = open_setup(config)
    n = setup.source.n("train")
    batches = ViewBatches(n, config.batch_size, -(-n // config.batch_size),
                          torch.Generator().manual_seed(config.seed), augmented=True)
    loader = torch.utils.data.DataLoader(ImageViews(setup, "train", augmented=True),
                                         batch_sampler=batches,
                                         num_workers=config.loader_workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def step_seconds(config, steps: int) -> dict[str, tuple[float, float]]:
    """Median seconds of one training step of kdcore's loop (:func:`view_step`: the teacher on
    the batch of augmented views, the student's forward and backward, the SGD step) over
    ``steps`` steps after a warm-up one, and seconds per test image predicted by the student;
    by the wall clock and in this process's CPU time."""
    from kdcore.learning.image_train import (
        ImageViews,
        ViewBatches,
        load_teacher,
        open_setup,
        view_step,
    )
    from kdcore.learning.train import make_optimizer, make_schedule

    device = torch.device(config.device)
    setup = open_setup(config)
    teacher = load_teacher(config, setup).to(device)
    student = build_model({"type": config.student_arch, "n_classes": setup.n_classes})
    student.to(device).train()
    optimizer = make_optimizer(student, config)
    schedule = make_schedule(optimizer, config, steps + 1)
    batches = ViewBatches(setup.source.n("train"), config.batch_size, 1,
                          torch.Generator().manual_seed(0), augmented=True)
    loader = torch.utils.data.DataLoader(ImageViews(setup, "train", augmented=True),
                                         batch_sampler=batches)
    x, y = (t.to(device) for t in next(iter(loader)))
    clocks = {"wall-clock": time.perf_counter, "CPU time": time.process_time}
    times: dict[str, list[float]] = {name: [] for name in clocks}
    for _ in range(steps + 1):
        start = {name: clock() for name, clock in clocks.items()}
        view_step(student, teacher, x, y, config, strategy=config.parsed(),
                  method=config.method(), epoch=0, optimizer=optimizer, schedule=schedule)
        if device.type == "cuda":
            torch.cuda.synchronize()
        for name, clock in clocks.items():
            times[name].append(clock() - start[name])
    student.eval()
    start = {name: clock() for name, clock in clocks.items()}
    with torch.inference_mode():
        student(x).cpu()
    return {name: (statistics.median(times[name][1:]), (clock() - start[name]) / len(x))
            for name, clock in clocks.items()}


def compare(fns: dict, configs: dict, n_train: int, rounds: int) -> None:
    """Interleaved rounds of the contenders; prints their speed, the ratios and the
    data-loading shares."""
    results: dict[str, list[dict]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}

    def recorded(name: str) -> None:
        start = time.process_time()
        results[name].append(fns[name]())
        cpu[name].append(time.process_time() - start)

    times = interleaved({name: partial(recorded, name) for name in fns}, rounds=rounds)
    for name in fns:
        best = min(times[name])
        print(f"{name:<22} {n_train / best:8.1f} train images/s (best of {rounds}: "
              f"{best:.2f} s an epoch; median {statistics.median(times[name]):.2f} s; CPU "
              f"time median {statistics.median(cpu[name]):.2f} s)")
    for tag in configs:
        for what, measured in (("wall-clock", times), ("CPU time", cpu)):
            med, low, high = ratio(measured, f"hand-written{tag}", f"kdcore{tag}")
            print(f"speed of kdcore / hand-written{tag} ({what}): {med:.3f}x (median over "
                  f"rounds; range {low:.3f}-{high:.3f}x; target >= 0.95x on CPU)")
    waits = [r["waiting"] / t for r, t in zip(results["hand-written"], times["hand-written"],
                                               strict=True)]
    loading = statistics.median(kdcore_loading(configs[""]) for _ in range(rounds))
    print(f"data loading: {statistics.median(waits):.1%} of the hand-written epoch waits for "
          f"batches; kdcore's loader alone takes {loading:.2f} s an epoch, "
          f"{loading / statistics.median(times['kdcore']):.1%} of its epoch")
    setup = statistics.median(kdcore_setup(configs[""]) for _ in range(rounds))
    print(f"kdcore's per-run setup (every image's header read, the teacher loaded and checked "
          f"on one image): {setup:.2f} s CPU, {setup / statistics.median(cpu['kdcore']):.1%} "
          "of its one-epoch run; paid once per run, not per epoch")


def estimate(config, steps: int) -> None:
    """Prints a CIFAR-100 epoch's time extrapolated from ``steps`` timed steps."""
    from kdcore.learning.image_train import PRESETS

    epochs = PRESETS["cifar"]["epochs"]
    batches = -(-CIFAR100_TRAIN // config.batch_size)
    print(f"CIFAR-100 epoch estimate, extrapolated (not measured) from {steps} timed steps of "
          f"{config.teacher_arch} -> {config.student_arch} at batch {config.batch_size} "
          f"(load average {os.getloadavg()[0]:.1f}):")
    for clock, (step, per_image) in step_seconds(config, steps).items():
        epoch = batches * step + CIFAR100_TEST * per_image
        whole = epochs * epoch
        print(f"  {clock:<10}: {batches} batches x {step:.3g} s + {CIFAR100_TEST:,} test "
              f"images x {per_image * 1e3:.3g} ms = {_span(epoch)} an epoch, "
              f"{_span(whole)} for {epochs}")


def _span(seconds: float) -> str:
    """A duration a reader takes in at a glance, from seconds to days (a GPU's epoch is
    seconds, a CPU's an hour)."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400,
                        help="images in the folder (80%% train, 20%% test)")
    parser.add_argument("--teacher", default="resnet32x4", help="zoo architecture")
    parser.add_argument("--student", default="resnet8x4", help="zoo architecture")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both loops)")
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="DataLoader worker processes (both loops)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved timing rounds (0: only the epoch estimate)")
    parser.add_argument("--estimate-steps", type=int, default=3,
                        help="training steps timed for the CIFAR-100 epoch estimate (0: none)")
    args = parser.parse_args()

    from kdcore.learning.train import TrainConfig

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as a job process runs (kdcore.learning.allocator)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on = (f"CUDA ({torch.cuda.get_device_name(0)})" if device.type == "cuda"
          else f"CPU, {args.threads} torch thread(s); no CUDA device visible")
    with tempfile.TemporaryDirectory(prefix="kdcore-bench-images-") as tmp:
        tmp = Path(tmp)
        folder = make_folder(tmp / "images", args.images)
        weights = make_weights(tmp / "teacher.pt", args.teacher)
        print(f"device: {on}; torch {torch.__version__}; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"{args.teacher} -> {args.student} (random weights), {args.images} random "
              f"{SIDE}x{SIDE} PNG images in {N_CLASSES} classes, batch {args.batch_size}, "
              f"{args.loader_workers} loader worker(s), one epoch per round, strategy kd, "
              "crop + flip, SGD")
        configs, fns = {}, {}
        for amp in (False, True) if device.type == "cuda" else (False,):
            tag = " + AMP" if amp else ""
            configs[tag] = config = TrainConfig.for_images(
                folder, student_arch=args.student, teacher_arch=args.teacher,
                teacher_weights=str(weights), strategy="kd", preset="cifar", epochs=1,
                batch_size=args.batch_size, loader_workers=args.loader_workers,
                device=device.type, amp=amp)
            fns[f"kdcore{tag}"] = partial(kdcore_epoch, config, tmp / "checkpoints")
            fns[f"hand-written{tag}"] = partial(
                hand_written, folder, args.teacher, weights, args.student,
                batch_size=args.batch_size, workers=args.loader_workers, device=device,
                amp=amp)
        if args.rounds:
            compare(fns, configs, len(Folder(folder, "train", augment=False)), args.rounds)
        if args.estimate_steps:
            estimate(configs[""], args.estimate_steps)


if __name__ == "__main__":
    main()
