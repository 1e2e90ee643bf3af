"""What a run is: :class:`TrainConfig`, stored whole with every run, and the checks of its
options and its data, all made before a run is stored.

A bundle's or table's run is planned with :meth:`TrainConfig.for_bundle`, an image folder's
with :meth:`TrainConfig.for_images` (its images, student and teacher are checked by
:mod:`kdcore.learning.image_setup`). The loops that train them are kdcore.learning.train
(bundles and tables) and kdcore.learning.image_train (image folders).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from kdcore.data import Dataset
from kdcore.errors import DataError
from kdcore.learning.image_setup import check_image_run, image_plan
from kdcore.learning.losses import Method, Strategy, method_for, parse_strategy
from kdcore.learning.models import check_io, spec_parameters
from kdcore.learning.teachers import check_teacher


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
    # An image run (kdcore.learning.image_train): ``bundle`` is an image folder or CIFAR folder,
    # the student a zoo architecture, the teacher a zoo architecture with its weights or a
    # program file (.ts/.pt2/.onnx), or none for ce. At their defaults these fields are left
    # out of to_dict, so bundle and tabular runs keep their stored configs and keys.
    student_arch: str = ""
    teacher_arch: str = ""
    teacher_weights: str = ""
    teacher_model: str = ""
    preset: str = ""  # the recipe the run started from (image_train.PRESETS), for the record
    momentum: float = 0.9  # SGD's
    lr_milestones: list = field(default_factory=list)  # epochs where "multistep" decays lr
    lr_decay: float = 0.1
    augment: bool = False  # random crop (zero padding 4) and horizontal flip
    normalize: str = ""  # a kdcore.learning.predict.NORMALIZE_PRESETS name; "" = none
    image_size: list = field(default_factory=list)  # [H, W] to resize to; [] = as stored
    # DataLoader worker processes: how fast, not what is trained, so never stored
    loader_workers: int = 0

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
        config = cls(**values).canonical()
        check_data(bundle)
        return config

    @classmethod
    def for_images(cls, images: str | Path, **overrides) -> TrainConfig:
        """An image run: the preset's recipe (``overrides["preset"]``), then the caller's
        overrides (None = keep); the folder, architectures and teacher are checked before
        anything is stored (see kdcore.learning.image_setup)."""
        values, source = image_plan(images, overrides)
        config = cls(**values).canonical()
        check_image_run(config, source)
        return config

    def canonical(self) -> TrainConfig:
        """The strategy under its canonical name; btkd with its subset normalisation."""
        self.strategy = self.parsed().name if self.strategy != "btkd" else "btkd"
        if self.strategy == "btkd":
            self.normalisation = "subset"
        return self

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
        for f in fields(self):
            if f.name in IMAGE_FIELDS and values[f.name] == _default(f):
                del values[f.name]
        del values["loader_workers"]  # not part of what the run is
        # so are a method's options at their defaults, which keeps kd and dkd runs of equal
        # settings in one comparison (kdcore.store.runs migrates older stores to this shape)
        method = self.method()
        if method is None or method == type(method)():
            del values["method_options"]
        else:
            values["method_options"] = asdict(method)
        return values


IMAGE_FIELDS = ("student_arch", "teacher_arch", "teacher_weights", "teacher_model", "preset",
                "momentum", "lr_milestones", "lr_decay", "augment", "normalize", "image_size")


def _default(f) -> object:
    return f.default_factory() if f.default_factory is not MISSING else f.default


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
    "lr_schedule": (lambda v: v in ("cosine", "constant", "multistep"),
                    "cosine, constant or multistep"),
    "momentum": (_real(0, 1), "a number from 0 to 1"),
    "lr_decay": (_real(0, 1, open_low=True), "a number above 0, at most 1"),
    "lr_milestones": (lambda v: isinstance(v, list) and all(map(_whole(1), v))
                      and v == sorted(set(v)), "increasing whole numbers of epochs, 1 or more"),
    "loader_workers": (_whole(0, 256), "a whole number, 0 or more"),
    "image_size": (lambda v: isinstance(v, list) and len(v) in (0, 2) and all(map(_whole(1), v)),
                   "[height, width] in pixels, or [] to keep the images' size"),
}
CLI_OPTIONS = ("epochs", "batch_size", "lr", "temperature", "lam", "loader_workers")


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

