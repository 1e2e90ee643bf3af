"""Run a teacher over an image source and write its prediction table, batch by batch.

``kdcore predict`` and the ``kdcore analyze IMAGES`` shortcut call this. The output is a Parquet
prediction table (``sample_id`` = the image's path relative to the root, ``split``, ``label`` =
class name or empty for unlabelled images, ``logit_<class>`` float32) that ``kdcore analyze``
and the dashboard read like any other; its schema metadata keeps the image root (so the
drill-down can show the images), the source kind, the model and the preprocessing.

Memory stays bounded: images are decoded one batch at a time and the logits go to disk in row
groups through ``pyarrow.parquet.ParquetWriter``. The table is written to a temporary file in
the output's folder and renamed at the end, so a failure or Ctrl-C leaves no file behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcore.data.tables import IMAGE_ROOT_KEY, LOGIT_PREFIX
from kdcore.errors import DataError
from kdcore.learning.allocator import heap_trimmer

__all__ = [
    "NORMALIZE_PRESETS",
    "PredictSummary",
    "Preprocess",
    "make_preprocess",
    "parse_image_size",
    "predict_path",
    "predict_source",
    "prediction_cache_path",
]

# Per-channel (mean, std) of the pixels in [0, 1]; cifar100 is mdistiller's.
NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "none": None,
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
KIND_KEY = "kdcore.image_kind"
MODEL_KEY = "kdcore.model"
PREPROCESS_KEY = "kdcore.preprocess"
DEFAULT_BATCH_SIZE = 64
MAX_IMAGE_SIDE = 8192
# Rows per Parquet row group: about this many logits (4 MB of float32), at least one batch.
ROW_GROUP_VALUES = 1 << 20
# Batches between two malloc_trim calls (see kdcore.learning.allocator.heap_trimmer).
TRIM_EVERY = 8


# --------------------------------------------------------------------------------------------
# Preprocessing


@dataclass(frozen=True)
class Preprocess:
    """What happens to the pixels (in [0, 1]) before the model: resize, then (x - mean) / std.

    ``size`` None keeps the images' own size (they must all share one); ``channels`` None keeps
    the source's channel count (3 for colour, 1 for greyscale images).
    """

    size: tuple[int, int] | None = None
    normalize: str = "none"  # a NORMALIZE_PRESETS name, or "custom" for mean/std given
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels: int | None = None

    def to_dict(self) -> dict:
        return {"size": list(self.size) if self.size else None, "normalize": self.normalize,
                "mean": list(self.mean) if self.mean else None,
                "std": list(self.std) if self.std else None, "channels": self.channels}

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalise a float32 (n, C, H, W) batch in place (it is ours: freshly decoded)."""
        if self.mean is None:
            return x
        if x.shape[1] != len(self.mean):
            raise DataError(
                f"the normalisation has {len(self.mean)} channel values but the images have "
                f"{x.shape[1]} channels; give --mean/--std with {x.shape[1]} values or "
                "--normalize none")
        mean = np.asarray(self.mean, dtype=np.float32)[None, :, None, None]
        std = np.asarray(self.std, dtype=np.float32)[None, :, None, None]
        x -= mean
        x /= std
        return x


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise DataError(f"{flag} {text!r} is not a list of numbers; write it like "
                        "0.5071,0.4867,0.4408") from None
    if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
        raise DataError(f"{flag} {text!r} needs 1 or 3 finite numbers (one per channel), "
                        "comma-separated")
    return values


def make_preprocess(*, normalize: str | None = None, mean: str | Sequence[float] | None = None,
                    std: str | Sequence[float] | None = None,
                    image_size: str | tuple[int, int] | None = None,
                    channels: int | None = None) -> Preprocess:
    """The preprocessing of the CLI's options: a preset (``--normalize``) or ``--mean`` with
    ``--std`` (not both), and ``--image-size``. Raises DataError naming the flag to fix."""
    name = normalize or "none"
    if name not in NORMALIZE_PRESETS:
        raise DataError(f"--normalize {name!r} is not known; use one of "
                        f"{', '.join(NORMALIZE_PRESETS)}")
    if (mean is None) != (std is None):
        raise DataError("--mean and --std go together: give both (one value per channel) or "
                        "neither")
    size = parse_image_size(image_size) if isinstance(image_size, str) else image_size
    if mean is not None:
        if name != "none":
            raise DataError(f"give --normalize {name} or --mean/--std, not both")
        m = _floats(mean, "--mean") if isinstance(mean, str) else tuple(map(float, mean))
        s = _floats(std, "--std") if isinstance(std, str) else tuple(map(float, std))
        if len(m) != len(s):
            raise DataError(f"--mean has {len(m)} values but --std has {len(s)}; give one per "
                            "channel to each")
        if min(s) <= 0:
            raise DataError("--std values must be greater than 0")
        return Preprocess(size=size, normalize="custom", mean=m, std=s,
                          channels=channels or (3 if len(m) == 3 else None))
    preset = NORMALIZE_PRESETS[name]
    if preset is None:
        return Preprocess(size=size, channels=channels)
    return Preprocess(size=size, normalize=name, mean=preset[0], std=preset[1],
                      channels=channels or 3)


def parse_image_size(text: str) -> tuple[int, int]:
    """``--image-size``: ``H`` (square) or ``H,W`` in pixels."""
    parts = str(text).replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(1 <= v <= MAX_IMAGE_SIDE for v in values):
        raise DataError(f"--image-size {text!r} is not a size; write H or H,W in pixels "
                        f"(1..{MAX_IMAGE_SIDE}), e.g. 32 or 224,224")
    return (values[0], values[-1])


# --------------------------------------------------------------------------------------------
# The prediction loop


@dataclass
class PredictSummary:
    """What ``kdcore predict --json`` prints."""

    out: Path
    n_images: int
    splits: dict[str, int]
    n_classes: int
    model: str
    seconds: float
    images_per_second: float

    def to_dict(self) -> dict:
        return {"out": str(self.out), "n_images": self.n_images, "splits": dict(self.splits),
                "n_classes": self.n_classes, "model": self.model, "seconds": self.seconds,
                "images_per_second": self.images_per_second}


def _schema(class_names: Sequence[str], metadata: dict[str, str]) -> pa.Schema:
    fields = [pa.field("sample_id", pa.string()), pa.field("split", pa.string()),
              pa.field("label", pa.string())]
    fields += [pa.field(f"{LOGIT_PREFIX}{c}", pa.float32()) for c in class_names]
    return pa.schema(fields, metadata={k.encode(): v.encode() for k, v in metadata.items()})


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give a file name such as preds.parquet")
    if not out.parent.is_dir():
        raise DataError(f"--out {out}: the folder {out.parent} does not exist; create it first")


def _run_model(predictor: Callable, x: np.ndarray, k: int, where: str) -> np.ndarray:
    """The model's logits for one batch, checked: (n, K) and finite."""
    try:
        logits = predictor(x)
    except DataError:
        raise
    except Exception as exc:  # the user's model refused the input (shape, channels, dtype)
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"the model failed on a batch of shape {tuple(x.shape)} from {where} "
                        f"({detail}); check --image-size, --normalize and the model's input"
                        ) from None
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise DataError(f"the model returned an array of shape {tuple(logits.shape)} for "
                        f"{x.shape[0]} images; it must return (images, classes) logits")
    if logits.shape[1] != k:
        raise DataError(f"the model outputs {logits.shape[1]} classes but {where} has {k}; "
                        "use a teacher trained on these classes (same count, same order)")
    return np.ascontiguousarray(logits, dtype=np.float32)


def predict_source(source, predictor: Callable[[np.ndarray], np.ndarray], out: str | Path, *,
                   preprocess: Preprocess = Preprocess(), batch_size: int = DEFAULT_BATCH_SIZE,
                   model: str = "", on_batch: Callable[[int], None] | None = None
                   ) -> PredictSummary:
    """Write ``predictor``'s logits for every image of ``source`` (an ImageSource, every split
    in its order) to the Parquet table ``out``; returns the counts and the speed.

    ``predictor`` maps a float32 (n, C, H, W) batch to (n, K) logits, K = the source's class
    count. ``on_batch(n)`` is called after each batch (a progress bar). On any error, or
    Ctrl-C, nothing is left at ``out`` (nor a temporary file).
    """
    if batch_size < 1:
        raise DataError("--batch-size must be at least 1")
    out = Path(out)
    _check_out(out)
    class_names = list(source.class_names)
    k = len(class_names)
    names = np.asarray(class_names + [""], dtype=object)  # label -1 (unlabelled) -> ""
    where = str(source.root)
    schema = _schema(class_names, {
        IMAGE_ROOT_KEY: str(Path(source.root).resolve()),
        KIND_KEY: str(source.kind),
        MODEL_KEY: model,
        PREPROCESS_KEY: json.dumps(preprocess.to_dict()),
    })
    group_rows = max(batch_size, ROW_GROUP_VALUES // max(k, 1))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer: pq.ParquetWriter | None = None
    counts: dict[str, int] = {}
    pending: list[tuple[list, str, np.ndarray, np.ndarray]] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal writer, pending_rows
        if not pending:
            return
        ids = [str(i) for part in pending for i in part[0]]
        splits = [part[1] for part in pending for _ in range(len(part[0]))]
        labels = names[np.concatenate([part[2] for part in pending])]
        logits = np.concatenate([part[3] for part in pending])
        columns = [pa.array(ids, pa.string()), pa.array(splits, pa.string()),
                   pa.array(labels, pa.string())]
        columns += [pa.array(logits[:, j]) for j in range(k)]
        if writer is None:
            writer = pq.ParquetWriter(str(tmp), schema)
        writer.write_table(pa.Table.from_arrays(columns, schema=schema))
        pending.clear()
        pending_rows = 0

    trim = heap_trimmer()
    batches = 0
    start = time.perf_counter()
    try:
        for split in source.splits:
            counts[split] = 0
            size, channels = preprocess.size, preprocess.channels
            for ids, x, labels in source.iter_batches(split, batch_size, size=size,
                                                       channels=channels):
                x = preprocess.apply(np.asarray(x, dtype=np.float32))
                logits = _run_model(predictor, x, k, where)
                bad = ~np.isfinite(logits).all(axis=1)
                if bad.any():
                    raise DataError(f"the model gave a non-finite logit (NaN or inf) for "
                                    f"{ids[int(np.argmax(bad))]} in {where}; check the model "
                                    "and its preprocessing")
                lab = (np.full(len(ids), -1, dtype=np.int64) if labels is None
                       else np.asarray(labels, dtype=np.int64))
                pending.append((list(ids), split, lab, logits))
                pending_rows += len(ids)
                counts[split] += len(ids)
                if pending_rows >= group_rows:
                    flush()
                batches += 1
                if batches % TRIM_EVERY == 0:
                    trim()
                if on_batch is not None:
                    on_batch(len(ids))
        flush()
        if writer is None:
            raise DataError(f"{where}: there are no images to predict; add images to the "
                            "train/test (and unlabelled) folders")
        writer.close()
        writer = None
        os.replace(tmp, out)
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:  # the original error is the one to report
                pass
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start
    n = sum(counts.values())
    return PredictSummary(out=out, n_images=n, splits={s: c for s, c in counts.items() if c},
                          n_classes=k, model=model, seconds=seconds,
                          images_per_second=n / seconds if seconds > 0 else float("nan"))


def predict_path(images: str | Path, out: str | Path, *, arch: str | None = None,
                 weights: str | Path | None = None, model_file: str | Path | None = None,
                 preprocess: Preprocess = Preprocess(), batch_size: int = DEFAULT_BATCH_SIZE,
                 threads: int | None = None, on_start: Callable[[int], None] | None = None,
                 on_batch: Callable[[int], None] | None = None) -> PredictSummary:
    """``kdcore predict``: open the image source and the teacher (see
    :func:`kdcore.learning.model_files.load_predictor`), then :func:`predict_source`.

    ``on_start(n_images)`` is called once both are open (to size a progress bar).
    """
    from kdcore.data.images import open_images
    from kdcore.learning.model_files import load_predictor

    if threads is not None and threads < 1:
        raise DataError("--threads must be at least 1")
    _check_out(Path(out))
    source = open_images(images)
    if preprocess.channels is None:  # the source's own (grey or RGB), which the model must take
        preprocess = replace(preprocess, channels=source.channels)  # known with mixed sizes too
    predictor = load_predictor(arch=arch, weights=weights, model_file=model_file,
                               n_classes=len(source.class_names),
                               in_channels=preprocess.channels, threads=threads)
    if on_start is not None:
        on_start(sum(source.n(s) for s in source.splits))
    return predict_source(source, predictor, out, preprocess=preprocess, batch_size=batch_size,
                          model=predictor.description, on_batch=on_batch)


# --------------------------------------------------------------------------------------------
# The analyze shortcut's cache


def _stamp(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _tree_stamp(root: Path) -> str:
    """A digest of every file under ``root`` (path, size, mtime): changes when an image is
    added, removed or rewritten. One stat per file, no reads. Hidden files and folders are
    left out, as the image reader skips them (a workspace ``.kdcore/`` inside the folder must
    not change the key by writing the predictions)."""
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            p = Path(folder, name)
            try:
                st = p.stat()
            except OSError:
                continue
            digest.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def prediction_cache_path(workspace: str | Path, images: str | Path, *, arch: str | None = None,
                          weights: str | Path | None = None,
                          model_file: str | Path | None = None,
                          preprocess: Preprocess = Preprocess()) -> Path:
    """Where ``kdcore analyze IMAGES`` keeps the predictions of this source, teacher and
    preprocessing: ``<workspace>/predictions/<name>-<key>.parquet``. The key hashes the root,
    every image's stamp, the model files' stamps and the options, so any change predicts anew.
    """
    root = Path(images).resolve()
    if not root.is_dir():
        raise DataError(f"{images}: no such folder; pass an image folder (train/, test/, "
                        "unlabelled/) or a CIFAR python-version folder")
    files = [Path(f) for f in (weights, model_file) if f is not None]
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: no such model file; check the path")
    key = {
        "root": str(root),
        "images": _tree_stamp(root),
        "arch": arch,
        "files": [_stamp(f) for f in files],
        "preprocess": preprocess.to_dict(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in root.name) or "images"
    return Path(workspace) / "predictions" / f"{name}-{digest}.parquet"
