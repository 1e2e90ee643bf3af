"""Image sources: an image folder in the ImageFolder layout, or a CIFAR python-version folder.

Folder layout (read with Pillow, no torchvision)::

    ROOT/train/<class>/*.png|jpg|...   labelled; the sorted class folder names are the classes
    ROOT/test/<class>/...              optional, held out; every class must be one of train's
    ROOT/unlabelled/*.png|...          optional, transfer images without labels, no folders

Within a class folder images may sit in sub-folders (as ImageFolder reads them). Hidden files
and folders (".DS_Store", ".ipynb_checkpoints") are skipped; files whose suffix is not in
:data:`IMAGE_SUFFIXES` (a README, a labels.csv) are skipped too and listed in
:attr:`ImageSource.skipped`, so the caller can say how many; a file with an image suffix that
is not a readable image is an error. A ``sample_id`` is the image's path relative to ROOT,
POSIX style (``train/cat/001.png``); for CIFAR ``<batch file>/<row>``.

Opening reads file listings and image headers only (``PIL.Image.open`` is lazy): a fraction
of a millisecond an image, so a large folder opens in seconds; pixels are decoded batch by
batch in :meth:`ImageSource.iter_batches`. EXIF orientation is not applied, as torchvision's
loader does not apply it: a teacher sees the pixels it was trained on. Unlike ImageFolder,
hidden folders in train/ are not classes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from kdcore.data.cifar import CifarArchive, find_cifar_dir, read_cifar
from kdcore.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "unlabelled", "test")
LABELLED = ("train", "test")
# Single-channel modes; anything else (RGB, RGBA, P, CMYK, ...) is colour.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})  # beyond 8 bits
# What Pillow raises on a bad file: UnidentifiedImageError and truncation are OSErrors.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_FIX_IMAGE = "replace or remove the file"


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


class ImageSource:
    """One image folder or one CIFAR archive, opened and validated.

    ``root`` is resolved; ``kind`` is ``"folder"`` or ``"cifar"``; ``splits`` lists the splits
    present, in the order train, unlabelled, test; labels index ``class_names``.
    """

    kind: str

    def __init__(self, root: Path, class_names: list[str], ids: dict[str, np.ndarray],
                 labels: dict[str, np.ndarray | None], *, skipped: list[str] | None = None):
        self.root = root
        self.class_names = class_names
        self.splits = [s for s in SPLITS if s in ids]
        self.skipped = skipped or []  # relative paths of ignored non-image files
        self._ids = ids
        self._labels = labels

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.n(s)}" for s in self.splits)
        return (f"{type(self).__name__}({str(self.root)!r}, kind={self.kind!r}, "
                f"{len(self.class_names)} classes, {counts})")

    def _split(self, split: str) -> str:
        if split not in self._ids:
            raise DataError(f"{self.root}: no {split!r} split (present: "
                            f"{', '.join(self.splits)})")
        return split

    def n(self, split: str) -> int:
        """The number of images in ``split``."""
        return len(self._ids[self._split(split)])

    def sample_ids(self, split: str) -> np.ndarray:
        """The sample ids of ``split`` (str), in sample order."""
        return self._ids[self._split(split)].copy()

    def labels(self, split: str) -> np.ndarray | None:
        """Class indices (int64) of ``split``; None for ``unlabelled``."""
        labels = self._labels[self._split(split)]
        return None if labels is None else labels.copy()

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of what :meth:`iter_batches` yields by default; None if sizes differ.

        Modes need not match: C is :attr:`channels`, to which every image is converted.
        """
        raise NotImplementedError

    @property
    def channels(self) -> int:
        """The default channel count: 1 if every image is grey, else 3 (known with mixed
        sizes too, where :attr:`image_shape` is None)."""
        return self._default_channels()

    def iter_batches(self, split: str, batch_size: int, *, size: tuple[int, int] | None = None,
                     channels: int | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """``(ids, x, labels)`` batches of ``split`` in sample order, one batch in memory.

        ``x`` is float32 (n, C, H, W) in [0, 1]. ``size=None`` needs every image of the source
        at one size (DataError naming the first that differs, raised by this call itself,
        before any output is opened or batch decoded);
        ``size=(H, W)`` resizes each image (bilinear). ``channels`` 1 or 3 converts every image
        to grey or RGB; by default RGB unless every image of the source is grey.
        """
        split = self._split(split)
        if size is not None:
            if not (len(size) == 2 and all(isinstance(v, (int, np.integer)) and v > 0
                                           for v in size)):
                raise DataError(f"image size {size!r}: give two positive integers, height and "
                                "width")
            size = (int(size[0]), int(size[1]))
        if channels not in (None, 1, 3):
            raise DataError(f"channels {channels!r}: give 1 (grey) or 3 (RGB)")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DataError(f"batch size {batch_size}: give a positive integer")
        channels = channels or self._default_channels()
        if size is None:
            self._check_one_size()
        return self._batches(split, batch_size, size, channels)

    def _batches(self, split, batch_size, size, channels):
        ids, labels = self._ids[split], self._labels[split]
        for start in range(0, len(ids), batch_size):
            stop = min(start + batch_size, len(ids))
            x = self._pixels(split, start, stop, size, channels)
            yield ids[start:stop], x, None if labels is None else labels[start:stop]

    def load_image(self, sample_id: str) -> Image.Image:
        """One image, decoded, as stored (for thumbnails); DataError if missing or unreadable."""
        raise NotImplementedError

    # What each kind provides.
    def _default_channels(self) -> int:
        raise NotImplementedError

    def _check_one_size(self) -> None:
        raise NotImplementedError

    def _pixels(self, split: str, start: int, stop: int, size: tuple[int, int] | None,
                channels: int) -> np.ndarray:
        raise NotImplementedError


def to_array(image: Image.Image, *, size: tuple[int, int] | None, channels: int) -> np.ndarray:
    """A decoded image as float32 (channels, H, W) in [0, 1], resized (bilinear) to ``size``.

    Palette and colour images convert to RGB (or L); 16-bit and float grey images are scaled
    from their own range (65535, or 1 for float), not clipped at 255.
    """
    if image.mode in WIDE_MODES:
        scale = 1.0 if image.mode == "F" else 65535.0
        image = image.convert("F")
    else:
        scale = 255.0
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # Pillow's advice for palette transparency
        target = "L" if channels == 1 or image.mode in GRAY_MODES else "RGB"
        if image.mode != target:
            image = image.convert(target)
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / np.float32(scale)
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    if scale == 1.0:
        np.clip(x, 0.0, 1.0, out=x)
    if channels == 3 and x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    return x


def decode(path: Path) -> Image.Image:
    """Open and fully decode one image file; DataError naming it if missing or corrupt."""
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise DataError(f"{path}: no such image; check the path or re-run on the current "
                        "folder") from None
    except _PIL_ERRORS as exc:
        raise DataError(f"{path}: cannot decode the image ({exc}); {_FIX_IMAGE}") from None
    return image


def read_image(root: str | Path, sample_id: str) -> Image.Image:
    """The image ``sample_id`` of the folder ``root``, without scanning the folder (cheap for
    thumbnails); DataError if the id leaves ``root``, or the file is missing or unreadable."""
    relative = PurePosixPath(sample_id)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise DataError(f"{sample_id!r}: not a sample id; sample ids are paths relative to "
                        f"{root}")
    return decode(Path(root) / relative)


class FolderSource(ImageSource):
    """An image folder; its headers read at open, its pixels decoded batch by batch."""

    kind = "folder"

    def __init__(self, root: Path, class_names: list[str], ids: dict[str, np.ndarray],
                 labels: dict[str, np.ndarray | None], sizes: dict[str, np.ndarray],
                 modes: dict[str, list[str]], skipped: list[str]):
        super().__init__(root, class_names, ids, labels, skipped=skipped)
        self._sizes = sizes  # (n, 2) width, height from the headers
        self._modes = modes

    def _all_sizes(self) -> np.ndarray:
        return np.concatenate([self._sizes[s] for s in self.splits])

    def _default_channels(self) -> int:
        grey = all(m in GRAY_MODES for s in self.splits for m in self._modes[s])
        return 1 if grey else 3

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        sizes = np.unique(self._all_sizes(), axis=0)
        if len(sizes) != 1:
            return None
        width, height = (int(v) for v in sizes[0])
        return self._default_channels(), height, width

    def _check_one_size(self) -> None:
        sizes = self._all_sizes()
        other = np.flatnonzero((sizes != sizes[0]).any(axis=1))
        if len(other):
            ids = np.concatenate([self._ids[s] for s in self.splits])
            (w0, h0), (w, h) = sizes[0], sizes[other[0]]
            raise DataError(f"{self.root / ids[other[0]]}: {h}x{w} pixels (height x width), "
                            f"but {ids[0]} is {h0}x{w0}; the images must share one size: "
                            "pass --image-size H,W to resize them")

    def _pixels(self, split, start, stop, size, channels):
        ids, sizes = self._ids[split], self._sizes[split]
        x = None
        for row, i in enumerate(range(start, stop)):
            path = self.root / ids[i]
            image = decode(path)
            if size is None and image.size != tuple(sizes[i]):
                raise DataError(f"{path}: changed since the folder was opened ({image.size[1]}"
                                f"x{image.size[0]} pixels, was {sizes[i][1]}x{sizes[i][0]}); "
                                "open the folder again")
            one = to_array(image, size=size, channels=channels)
            if x is None:
                x = np.empty((stop - start, *one.shape), dtype=np.float32)
            x[row] = one
        return x

    def load_image(self, sample_id: str) -> Image.Image:
        return read_image(self.root, sample_id)


class CifarSource(ImageSource):
    """A CIFAR-10/100 archive, held in memory as uint8 (150 MB for CIFAR's 50,000 images)."""

    kind = "cifar"

    def __init__(self, archive: CifarArchive):
        super().__init__(archive.root, archive.class_names, dict(archive.ids),
                         dict(archive.labels))
        self._images = archive.images
        self._rows = {i: (split, row) for split in self.splits
                      for row, i in enumerate(archive.ids[split])}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self._images["train"].shape[1:])

    def _default_channels(self) -> int:
        return 3

    def _check_one_size(self) -> None:
        return None  # every CIFAR image is 32x32

    def _pixels(self, split, start, stop, size, channels):
        images = self._images[split][start:stop]
        if size is None and channels == 3:
            return images.astype(np.float32) / np.float32(255.0)
        return np.stack([to_array(Image.fromarray(image.transpose(1, 2, 0)), size=size,
                                  channels=channels) for image in images])

    def load_image(self, sample_id: str) -> Image.Image:
        if sample_id not in self._rows:
            raise DataError(f"{sample_id!r}: no such image in {self.root}; CIFAR sample ids "
                            "are <batch file>/<row>")
        split, row = self._rows[sample_id]
        return Image.fromarray(self._images[split][row].transpose(1, 2, 0))


def _scan_images(folder: Path, root: Path, skipped: list[str]) -> list[str]:
    """Sample ids of the images under ``folder``, in ImageFolder's order (folders sorted, files
    sorted within each, links followed); other files' ids go to ``skipped``. os.walk, not
    pathlib: ten thousand files list in a tenth of the time."""
    walked = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        walked.append((dirpath, filenames))
    found = []
    for dirpath, filenames in sorted(walked):
        prefix = Path(dirpath).relative_to(root).as_posix()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            is_image = os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
            (found if is_image else skipped).append(f"{prefix}/{name}")
    return found


def _header(path: str) -> tuple[int, int, str]:
    """(width, height, mode) from the header; DataError if it is not a readable image.

    PNG files are also checked to end with their IEND chunk (one small read), which catches
    the common truncated download before any decoding.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            mode, kind = image.mode, image.format
            if kind == "PNG":
                image.fp.seek(0, 2)
                image.fp.seek(max(0, image.fp.tell() - 64))
                if b"IEND" not in image.fp.read():
                    raise DataError(f"{path}: the PNG file is truncated (no IEND chunk at its "
                                    f"end); {_FIX_IMAGE}")
    except DataError:
        raise
    except _PIL_ERRORS as exc:
        raise DataError(f"{path}: not a readable image ({exc}); {_FIX_IMAGE}") from None
    return width, height, mode


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted((p for p in split_dir.iterdir() if p.is_dir() and not _hidden(p)),
                  key=lambda p: p.name)


def _stray_image(split_dir: Path, what: str) -> None:
    for path in sorted(split_dir.iterdir()):
        if path.is_file() and not _hidden(path) and path.suffix.lower() in IMAGE_SUFFIXES:
            raise DataError(f"{path}: an image outside a class folder; move it into "
                            f"{split_dir.name}/<class>/ ({what})")


def _open_folder(root: Path) -> FolderSource:
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root}: no train/ folder; an image folder holds train/<class>/*.png "
                        "(optionally test/<class>/ and unlabelled/), or pass a CIFAR python "
                        "version folder")
    for name in ("val", "valid", "validation"):
        if (root / name).is_dir():
            raise DataError(f"{root / name}: kdcore reads the splits train/, test/ and "
                            f"unlabelled/; rename {name}/ to test/ to use it as held-out data")
    skipped: list[str] = []
    class_names = [p.name for p in _class_folders(train_dir)]
    if not class_names:
        raise DataError(f"{train_dir}: no class folders; put each class's images in "
                        "train/<class>/")
    files: dict[str, list[str]] = {}
    labels: dict[str, np.ndarray | None] = {}
    for split in LABELLED:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        _stray_image(split_dir, "the folder name is the image's class")
        paths, y = [], []
        for folder in _class_folders(split_dir):
            if folder.name not in class_names:
                raise DataError(f"{folder}: class {folder.name!r} is not in train/; add "
                                f"train/{folder.name}/ or remove {split}/{folder.name}/")
            images = _scan_images(folder, root, skipped)
            if not images:
                raise DataError(f"{folder}: an empty class folder; add its images or remove "
                                "the folder")
            paths += images
            y += [class_names.index(folder.name)] * len(images)
        if not paths:
            raise DataError(f"{split_dir}: no class folders; put each class's images in "
                            f"{split}/<class>/ or remove {split}/")
        files[split], labels[split] = paths, np.array(y, dtype=np.int64)
    unlabelled = root / "unlabelled"
    if unlabelled.is_dir():
        folders = _class_folders(unlabelled)
        if folders:
            raise DataError(f"{folders[0]}: a folder inside unlabelled/; put unlabelled images "
                            "directly in unlabelled/ (labelled ones in train/<class>/)")
        paths = _scan_images(unlabelled, root, skipped)
        if not paths:
            raise DataError(f"{unlabelled}: no images; add transfer images or remove the "
                            "folder")
        files["unlabelled"], labels["unlabelled"] = paths, None
    ids, sizes, modes = {}, {}, {}
    for split in (s for s in SPLITS if s in files):
        headers = [_header(os.path.join(root, i)) for i in files[split]]
        ids[split] = np.array(files[split], dtype=str)
        sizes[split] = np.array([h[:2] for h in headers], dtype=np.int64).reshape(-1, 2)
        modes[split] = [h[2] for h in headers]
    return FolderSource(root, class_names, ids, labels, sizes, modes, skipped)


def open_images(path: str | Path) -> ImageSource:
    """An image folder or a CIFAR python-version folder (or its parent), validated.

    DataError, one line naming the file and the fix, on anything a model could not read.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such folder; pass an image folder (train/<class>/...) "
                        "or a CIFAR python version folder")
    if not path.is_dir():
        raise DataError(f"{path}: a file, not a folder; pass an image folder (train/<class>/"
                        "...) or a CIFAR python version folder")
    root = path.resolve()
    if (root / "train").is_dir():
        return _open_folder(root)
    if find_cifar_dir(root) is not None:
        return CifarSource(read_cifar(root))
    return _open_folder(root)  # raises: no train/ folder


def is_image_source(path: str | Path) -> bool:
    """Cheap: a folder with train/ holding a class folder, or a CIFAR python-version folder."""
    path = Path(path)
    try:
        train = path / "train"
        if train.is_dir() and any(p.is_dir() and not _hidden(p) for p in train.iterdir()):
            return True
        return find_cifar_dir(path) is not None
    except (OSError, DataError):
        return False
