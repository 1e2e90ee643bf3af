"""CIFAR-10 and CIFAR-100 from their official "python version" folders, nothing downloaded.

The batches are pickles, and unpickling runs whatever a file names, so they are read with
:class:`CifarUnpickler`: it resolves only the few globals a CIFAR batch needs, each wrapped so
that it can build nothing but plain numeric arrays and bytes (see :data:`ALLOWED_GLOBALS`).
A file naming anything else is refused before any of it runs.

Layouts (the folder itself, or its parent holding it under the official name)::

    cifar-10-batches-py/   batches.meta (label_names), data_batch_1..5, test_batch (labels)
    cifar-100-python/      meta (fine_label_names), train, test (fine_labels)

A batch is a dict with bytes keys (``encoding="bytes"``, as the official loader reads it):
``data`` a (n, 3072) uint8 array, rows of 1024 red, then green, then blue values of a 32x32
image, and a list of n integer labels.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdcore.errors import DataError

SIDE = 32
ROW = 3 * SIDE * SIDE


@dataclass(frozen=True)
class Layout:
    """Where one CIFAR variant keeps its files and which keys it uses."""

    folder: str  # the official folder name
    meta: str
    names_key: bytes
    labels_key: bytes
    train: tuple[str, ...]
    test: tuple[str, ...]


LAYOUTS = (
    Layout("cifar-10-batches-py", "batches.meta", b"label_names", b"labels",
           tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",)),
    Layout("cifar-100-python", "meta", b"fine_label_names", b"fine_labels",
           ("train",), ("test",)),
)


# How a batch's numpy arrays pickle: ``_reconstruct(ndarray, (0,), b"b")`` then BUILD with
# ``(version, shape, dtype, fortran, raw bytes)``; the dtype as ``dtype("u1", False, True)``
# then BUILD with ``(3, byteorder, subarray, names, fields, ...)``. Python 3 writes bytes at
# protocol 2 as ``_codecs.encode(text, "latin1")``. None of numpy's own constructors or
# ``__setstate__`` ever sees the file's values: the globals resolve to the inert stand-ins
# below, which check each value and build the array themselves with ``np.frombuffer`` over a
# plain numeric dtype. So a file can make nothing but bytes, text, numbers, containers and
# numeric arrays, whatever it holds.
_NUMERIC = frozenset(f"{kind}{size}" for kind, sizes in
                     (("u", "1248"), ("i", "1248"), ("f", "248"), ("b", "1")) for size in sizes)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class Refused(pickle.UnpicklingError):
    """The pickle holds ``what``, outside what a CIFAR batch holds; none of it was called."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _refuse(what: str):
    raise Refused(what)


class _Global:
    """What an allowed global resolves to: calls ``make``, and refuses BUILD, so that a file
    cannot set attributes on a global shared by every load."""

    def __init__(self, make=None):
        self._make = make

    def __call__(self, *args):
        if self._make is None:
            _refuse("a call of numpy.ndarray")
        return self._make(*args)

    def __setstate__(self, state):
        _refuse("state for a numpy or codecs global")


class _NdarrayToken(_Global):
    """``numpy.ndarray``: accepted only as :func:`_reconstruct`'s first argument."""


class _Dtype:
    """``numpy.dtype(spec, align, copy)`` for a plain numeric ``spec`` (no objects, fields)."""

    def __init__(self, spec, align=False, copy=True):
        spec = _text(spec)  # Python 2 files hold it as bytes, read with encoding="bytes"
        if spec not in _NUMERIC:
            _refuse(f"a numpy dtype {spec!r}")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state):
        order = _text(state[1]) if isinstance(state, tuple) and len(state) >= 5 else None
        if order not in ("|", "<", ">", "=") or state[2:5] != (None, None, None):
            _refuse("a structured or malformed numpy dtype")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


class _Array:
    """An ndarray from ``_reconstruct``; its BUILD state becomes :attr:`array`."""

    array: np.ndarray | None = None

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # (version, shape, dtype, fortran, raw)
        if not (isinstance(state, tuple) and len(state) == 4):
            _refuse("a malformed numpy array")
        shape, dtype, fortran, raw = state
        if isinstance(raw, str):
            raw = raw.encode("latin1")
        if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)
                and isinstance(dtype, _Dtype) and isinstance(raw, bytes)
                and len(raw) == math.prod(shape) * dtype.dtype.itemsize):
            _refuse("a malformed numpy array")
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order="F" if fortran else "C")


def _reconstruct(subtype, shape, typecode):
    if not isinstance(subtype, _NdarrayToken):
        _refuse("a numpy _reconstruct call for something other than an ndarray")
    return _Array()


def _latin1(text, encoding):
    """``_codecs.encode(text, "latin1")``: how Python 3 writes bytes at protocol 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        _refuse("a _codecs.encode call other than text to latin1")
    return text.encode("latin1")


ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _Global(_reconstruct),
    ("numpy._core.multiarray", "_reconstruct"): _Global(_reconstruct),  # numpy >= 2 writes it
    ("numpy", "ndarray"): _NdarrayToken(),
    ("numpy", "dtype"): _Global(_Dtype),
    ("_codecs", "encode"): _Global(_latin1),
}


def _unwrap(obj):
    """The loaded object with each :class:`_Array` replaced by its ndarray."""
    if isinstance(obj, _Array):
        if obj.array is None:
            _refuse("a numpy array without its data")
        return obj.array
    if isinstance(obj, dict):
        return {key: _unwrap(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(value) for value in obj)
    if isinstance(obj, (_Dtype, _Global)):
        _refuse("a bare numpy or codecs global")
    return obj


class CifarUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_GLOBALS`; any other global is refused before it runs."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise Refused(f"{module}.{name}") from None


def load_batch(path: Path) -> dict:
    """One CIFAR pickle as a dict with bytes keys; DataError if it is anything else."""
    try:
        with open(path, "rb") as f:
            obj = _unwrap(CifarUnpickler(f, encoding="bytes").load())
    except Refused as exc:
        raise DataError(f"{path}: holds {exc.what}, which is not part of a CIFAR batch; it is "
                        "not loaded (use the official python version files)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); check the file's "
                        "permissions") from None
    except Exception as exc:  # any malformed pickle: truncated, wrong opcodes, bad state
        raise DataError(f"{path}: not a readable CIFAR batch ({type(exc).__name__}: {exc}); "
                        "re-extract the official python version archive") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not the dict of a CIFAR "
                        "batch; re-extract the official python version archive")
    return obj


def _field(batch: dict, key: bytes, path: Path):
    if key not in batch:
        raise DataError(f"{path}: no {key.decode()!r} entry; re-extract the official python "
                        "version archive")
    return batch[key]


@dataclass(frozen=True)
class CifarArchive:
    """A CIFAR folder read into memory: images (n, 3, 32, 32) uint8 per split, in file order."""

    root: Path
    class_names: list[str]
    ids: dict[str, np.ndarray] = field(repr=False)  # "<batch file>/<row>"
    images: dict[str, np.ndarray] = field(repr=False)
    labels: dict[str, np.ndarray] = field(repr=False)


def _layout_of(folder: Path) -> Layout | None:
    for layout in LAYOUTS:
        if (folder / layout.meta).is_file() and (folder / layout.train[0]).is_file():
            return layout
    return None


def find_cifar_dir(path: str | Path) -> Path | None:
    """The CIFAR folder at ``path``, or under it by its official name; None if neither."""
    path = Path(path)
    if not path.is_dir():
        return None
    if _layout_of(path) is not None:
        return path
    found = [path / lay.folder for lay in LAYOUTS if _layout_of(path / lay.folder) is not None]
    if len(found) > 1:
        raise DataError(f"{path}: holds both {found[0].name} and {found[1].name}; pass one of "
                        "them")
    return found[0] if found else None


def _read_split(root: Path, layout: Layout, files: tuple[str, ...], n_classes: int):
    ids, images, labels = [], [], []
    for name in files:
        path = root / name
        if not path.is_file():
            raise DataError(f"{path}: missing from the CIFAR folder; re-extract the official "
                            "python version archive")
        batch = load_batch(path)
        data = _field(batch, b"data", path)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == ROW and len(data)):
            shape = getattr(data, "shape", None)
            raise DataError(f"{path}: 'data' is {getattr(data, 'dtype', type(data).__name__)} "
                            f"of shape {shape}, not (n, {ROW}) uint8; re-extract the official "
                            "python version archive")
        y = _field(batch, layout.labels_key, path)
        try:
            y = np.asarray(y, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise DataError(f"{path}: {layout.labels_key.decode()!r} is not a list of integer "
                            "labels; re-extract the official python version archive") from None
        if len(y) != len(data):
            raise DataError(f"{path}: {len(y)} labels for {len(data)} images; re-extract the "
                            "official python version archive")
        bad = np.flatnonzero((y < 0) | (y >= n_classes))
        if len(bad):
            raise DataError(f"{path}: label {y[bad[0]]} at row {bad[0]} is outside 0..."
                            f"{n_classes - 1} ({n_classes} classes in {layout.meta}); "
                            "re-extract the official python version archive")
        ids.append(np.array([f"{name}/{i}" for i in range(len(data))]))
        images.append(data.reshape(-1, 3, SIDE, SIDE))
        labels.append(y)
    return np.concatenate(ids), np.concatenate(images), np.concatenate(labels)


def read_cifar(path: str | Path) -> CifarArchive:
    """Read a CIFAR-10/100 python-version folder (or its parent); DataError on bad input."""
    root = find_cifar_dir(path)
    if root is None:
        raise DataError(f"{path}: not a CIFAR python version folder; pass cifar-10-batches-py "
                        "or cifar-100-python (or the folder holding it)")
    root = root.resolve()
    layout = _layout_of(root)
    meta_path = root / layout.meta
    names = _field(load_batch(meta_path), layout.names_key, meta_path)
    if not isinstance(names, list) or not names:
        raise DataError(f"{meta_path}: {layout.names_key.decode()!r} is not a list of class "
                        "names; re-extract the official python version archive")
    class_names = [_text(name) for name in names]
    ids, images, labels = {}, {}, {}
    for split, files in (("train", layout.train), ("test", layout.test)):
        ids[split], images[split], labels[split] = _read_split(root, layout, files,
                                                               len(class_names))
    return CifarArchive(root, class_names, ids, images, labels)
