"""What an image run reads, checked before it is stored: its images and their preparation,
its student architecture, and its teacher as a frozen module whatever file it came from.

:meth:`kdcore.learning.config.TrainConfig.for_images` plans a run with :func:`image_plan` and
:func:`check_image_run`; the loop (kdcore.learning.image_train) and the ROI's measurement
(:func:`kdcore.learning.image_train.load_run_models`) open the same setup and teacher.
``config`` is a TrainConfig (read by its image fields only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from kdcore.data.images import ImageSource, open_images
from kdcore.errors import DataError
from kdcore.learning.model_files import image_architectures, load_predictor, load_torch_model
from kdcore.learning.models import INPUT_CHECKS
from kdcore.learning.predict import NORMALIZE_PRESETS, Preprocess, make_preprocess

if TYPE_CHECKING:
    from kdcore.learning.config import TrainConfig

# mdistiller's CIFAR-100 recipe (configs/cifar/*.yaml and its train loader): batch 64, SGD
# with momentum 0.9 and weight decay 5e-4, lr 0.05 divided by 10 at epochs 150, 180 and 210
# of 240, random crop 32 with padding 4 and horizontal flip, CIFAR-100's mean and std.
PRESETS: dict[str, dict] = {
    "cifar": {"batch_size": 64, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
              "lr": 0.05, "lr_schedule": "multistep", "lr_milestones": [150, 180, 210],
              "lr_decay": 0.1, "epochs": 240, "augment": True, "normalize": "cifar100"},
}
EXAMPLE_BATCH = 64  # example inputs given to the ROI's measurement


# --------------------------------------------------------------------------------------------
# Planning: every check before anything is stored


@dataclass
class Setup:
    """What a run reads: its images, how they are prepared, and their shape."""

    source: ImageSource
    preprocess: Preprocess
    size: tuple[int, int] | None
    channels: int
    n_classes: int


def image_plan(images: str | Path, overrides: dict) -> tuple[dict, ImageSource]:
    """An image run's config values, and its opened source: the preset's recipe
    (:data:`PRESETS`), then ``overrides`` (None = keep); the folder as its resolved root, the
    teacher's files as absolute paths (a job or a resume may run elsewhere)."""
    preset = overrides.get("preset") or ""
    if preset not in PRESETS and preset:
        raise DataError(f"--preset {preset!r} is not known; use one of {', '.join(PRESETS)}")
    values = dict(PRESETS.get(preset, {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    source = open_images(images)
    values["bundle"] = str(source.root)
    for key in ("teacher_weights", "teacher_model"):
        if values.get(key):
            values[key] = str(Path(values[key]).expanduser().resolve())
    return values, source


def check_image_run(config: TrainConfig, source: ImageSource | None = None) -> None:
    """Refuse, with one line, an image run that could not train: see :func:`open_setup` and
    :func:`load_teacher`, and a distilling strategy needs a teacher."""
    teacher = load_teacher(config, open_setup(config, source))
    if config.parsed().distills and teacher is None:
        raise DataError(f"strategy {config.strategy} distils and needs a teacher: give "
                        "--teacher ARCH --teacher-weights FILE or --teacher-model FILE "
                        "(.ts, .pt2 or .onnx), or train with --strategy ce")


def open_setup(config: TrainConfig, source: ImageSource | None = None) -> Setup:
    """The run's images and preprocessing, checked: a test split to measure on, images the
    student takes, a normalisation with one value per channel."""
    source = source or open_images(config.bundle)
    if "test" not in source.splits:
        raise DataError(f"{source.root}: no test/ folder; add test/<class>/ images to measure "
                        "the student on")
    if config.student_arch not in image_architectures():
        raise DataError(f"unknown architecture {config.student_arch!r} for --student; use one "
                        f"of {', '.join(image_architectures())}")
    if config.normalize and config.normalize not in NORMALIZE_PRESETS:
        raise DataError(f"--normalize {config.normalize!r} is not known; use one of "
                        f"{', '.join(NORMALIZE_PRESETS)}")
    size = tuple(config.image_size) or None
    channels = source.channels
    source.iter_batches("train", 1, size=size, channels=channels)  # one size, or --image-size
    shape = (channels, *(size or source.image_shape[1:]))
    try:
        INPUT_CHECKS[config.student_arch](shape, in_channels=channels)
    except DataError as exc:
        raise DataError(f"--student {config.student_arch}: {exc}") from None
    preprocess = make_preprocess(normalize=config.normalize or None, channels=channels)
    if preprocess.mean is not None and len(preprocess.mean) != channels:
        raise DataError(f"--normalize {config.normalize} has {len(preprocess.mean)} channel "
                        f"values and the images of {source.root} have {channels}; use "
                        "--normalize none")
    return Setup(source, preprocess, size, channels, len(source.class_names))


# --------------------------------------------------------------------------------------------
# The teacher


class Teacher(nn.Module):
    """A frozen teacher as a module whatever its file: a torch module (zoo, TorchScript,
    torch.export) runs on the batch's device; an ONNX model runs in ONNX Runtime on the CPU.
    Its forward gives the logits alone (a tuple's first tensor, a dict's ``"logits"``, as
    :mod:`kdcore.learning.model_files` reads them)."""

    def __init__(self, model: object, description: str):
        super().__init__()
        self.description = description
        if isinstance(model, nn.Module):
            self.model = model  # run under inference_mode: no gradients, no graph
            self.predictor = None
        else:  # an ONNX Runtime predictor: numpy in, numpy out
            self.predictor = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.predictor is not None:
            return torch.from_numpy(self.predictor(x.detach().cpu().numpy())).to(x.device)
        out = self.model(x)
        if isinstance(out, dict):
            out = out.get("logits", next(iter(out.values()), None))
        while isinstance(out, (tuple, list)) and out:
            out = out[0]
        return out

    def train(self, mode: bool = True) -> Teacher:
        """Always frozen: its modules keep the mode they were saved in (a torch.export
        program's module cannot switch modes at all)."""
        return self

    @property
    def parameter_count(self) -> int | None:
        """Its parameters (all frozen); None for ONNX, whose weights torch does not see."""
        if self.predictor is not None:
            return None
        return sum(p.numel() for p in self.model.parameters())


def load_teacher(config: TrainConfig, setup: Setup) -> Teacher | None:
    """The config's teacher, checked on one test image to give one logit per class of the
    data; None when the config names none."""
    arch, weights, program = config.teacher_arch, config.teacher_weights, config.teacher_model
    if program and (arch or weights):
        raise DataError("give the teacher either as --teacher ARCH --teacher-weights FILE or "
                        "as --teacher-model FILE, not both")
    if bool(arch) != bool(weights):
        raise DataError("--teacher ARCH and --teacher-weights FILE go together: give both, or "
                        "the whole model as --teacher-model FILE")
    if not (arch or program):
        return None
    if arch and arch not in image_architectures():
        raise DataError(f"unknown architecture {arch!r} for --teacher; use one of "
                        f"{', '.join(image_architectures())}, or give the whole model as "
                        "--teacher-model FILE")
    options = {"n_classes": setup.n_classes}
    if Path(program).suffix.lower() == ".onnx":
        predictor = load_predictor(model_file=program, **options)
        teacher = Teacher(predictor, predictor.description)
    else:
        model = load_torch_model(arch=arch or None, weights=weights or None,
                                 model_file=program or None, in_channels=setup.channels,
                                 **options)
        teacher = Teacher(model, f"{arch} + {Path(weights).name}" if arch else Path(program).name)
    _probe(teacher, setup, Path(program or weights))
    return teacher


def _probe(teacher: Teacher, setup: Setup, file: Path) -> None:
    """One test image through the teacher: it must take the images and give K logits."""
    x = torch.from_numpy(example_inputs(setup, 1))
    try:
        with torch.inference_mode():
            out = teacher(x)
    except DataError:
        raise
    except Exception as exc:  # the program refused the input (shape, channels, dtype)
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"{file}: fails on images of shape {tuple(x.shape)} ({detail}); check "
                        "--image-size and that it takes these images") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        raise DataError(f"{file}: gives output of shape {getattr(out, 'shape', None)} for one "
                        "image, not (n, n_classes) logits; save a model whose forward returns "
                        "the class logits")
    if out.shape[1] != setup.n_classes:
        raise DataError(f"{file}: gives {out.shape[1]} logits per image, and the data has "
                        f"{setup.n_classes} classes; give the teacher trained on these classes")


def teacher_logits(teacher: Teacher, inputs: torch.Tensor, *, amp: bool = False) -> torch.Tensor:
    """The frozen teacher's logits of these very inputs (float32, a normal tensor that the
    loss may save for backward)."""
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        out = teacher(inputs)
    return out.float().clone()


def example_inputs(setup: Setup, n: int = EXAMPLE_BATCH) -> np.ndarray:
    """The first ``n`` test images, prepared as the student sees them (no augmentation)."""
    _, x, _ = next(setup.source.iter_batches("test", n, size=setup.size,
                                             channels=setup.channels))
    return setup.preprocess.apply(x)


