"""Shared, cached loaders for every dashboard page: the run store, data sources, bundles,
image folders, thumbnails and the ROI measurement.

Pages import this module; it holds no UI beyond ``show_error``. Data sources are named by
what a user sees in a selectbox: the bundled sample first, then other bundles found in the
workspace, then the prediction tables ``kdcore predict`` wrote there (the Data page's image
folders, ``kdcore analyze IMAGES``), then accepted uploads (kept in
``st.session_state["data_uploads"]``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import streamlit as st

from kdcore.data import thumbnails
from kdcore.data.bundles import Bundle, is_bundle, load_bundle, sample_bundle_path
from kdcore.data.cifar import find_cifar_dir
from kdcore.data.images import ImageSource, open_images
from kdcore.data.sources import bundle_table, load_predictions
from kdcore.data.tables import LOGIT_PREFIX, PredictionTable, read_prediction_table
from kdcore.errors import DataError, KDCoreError
from kdcore.learning.strategies import plain_name
from kdcore.store.runs import RunStore
from kdcore.store.tasks import PREDICTIONS_DIR
from kdcore.workspace import resolve_workspace

UPLOADS = "data_uploads"          # session key: upload display name -> PredictionTable
UPLOAD_TOKENS = "data_upload_tokens"  # session key: upload display name -> content hash
UPLOAD_PREFIX = "upload:"
TABLE_PREFIX = "table:"  # a prediction table file in <workspace>/predictions
SAMPLE_LABEL = " (bundled sample)"
PREDICTED_LABEL = " (predicted)"


def workspace() -> Path:
    """The workspace folder the app reads and writes ($KDCORE_HOME, else ./.kdcore)."""
    return resolve_workspace()


@st.cache_resource(show_spinner=False)
def _store(path: str) -> RunStore:
    return RunStore(path)


def store() -> RunStore:
    """The run store of the current workspace (one per workspace, shared by all sessions)."""
    return _store(str(workspace()))


def bundle_choices() -> dict[str, str]:
    """Bundle display name -> folder: the bundled sample, then ``<workspace>/bundles/*``."""
    sample = sample_bundle_path()
    choices = {f"{sample.name}{SAMPLE_LABEL}": str(sample)}
    folder = workspace() / "bundles"
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_dir() and is_bundle(path) and path.name not in choices:
                choices[path.name] = str(path)
    return choices


def prediction_name(path: str | Path) -> str:
    """The source name of a prediction table in ``<workspace>/predictions``."""
    return Path(path).stem + PREDICTED_LABEL


def sources() -> dict[str, str]:
    """Data source display name -> bundle path, ``table:<path>`` for a prediction table in the
    workspace, or ``upload:<name>`` for an accepted upload."""
    choices = dict(bundle_choices())
    folder = workspace() / PREDICTIONS_DIR
    if folder.is_dir():
        for path in sorted(folder.glob("*.parquet")):
            choices.setdefault(prediction_name(path), TABLE_PREFIX + str(path))
    for name in st.session_state.get(UPLOADS, {}):
        choices[name] = UPLOAD_PREFIX + name
    return choices


@contextmanager
def _readable(path: str) -> Iterator[None]:
    """Any failure to read the bundle at ``path`` as a one-line DataError with the fix: a folder
    dropped into <workspace>/bundles is user input, and pages show a KDCoreError as one line
    where anything else would be a traceback in the browser."""
    try:
        yield
    except KDCoreError:
        raise
    except Exception as exc:  # the bundle's content decides what is raised
        detail = " ".join(str(exc).split())[:200] or "no detail"
        raise DataError(f"the bundle {path} cannot be read ({type(exc).__name__}: {detail}); "
                        "fix its manifest.json and data.npz (see sample_data/README.md) or move "
                        f"the folder out of {Path(path).parent}") from None


@st.cache_data(show_spinner="Loading the data…", max_entries=8)
def _load_path(path: str, mtime: float) -> PredictionTable:
    with _readable(path):
        return load_predictions(path)


@st.cache_resource(show_spinner=False, max_entries=8)
def _load_bundle(path: str, mtime: float) -> Bundle:
    with _readable(path):
        bundle = load_bundle(path)
        # read once, here, what the pages read: a bad bundle fails now, as one line
        bundle.arrays, bundle.class_names, bundle.training_defaults  # noqa: B018
    return bundle


@st.cache_data(show_spinner="Loading the data…", max_entries=8)
def _bundle_table(path: str, mtime: float, _bundle: Bundle) -> PredictionTable:
    """A bundle's prediction table, made from the bundle already read (not read twice)."""
    with _readable(path):
        return bundle_table(_bundle)


def _mtime(path: str) -> float:
    """When the bundle (its manifest) or the table file at ``path`` last changed."""
    file = Path(path.removeprefix(TABLE_PREFIX))
    try:
        return (file if path.startswith(TABLE_PREFIX) else file / "manifest.json").stat().st_mtime
    except OSError:
        return 0.0


def source_token(name: str) -> str:
    """A key that changes when the source's content does (for st.cache_data keys)."""
    value = sources().get(name)
    if value is None:
        raise KeyError(name)
    if value.startswith(UPLOAD_PREFIX):
        return value + ":" + st.session_state.get(UPLOAD_TOKENS, {}).get(name, "")
    return f"{value}:{_mtime(value)}"


def load_source(name: str) -> PredictionTable:
    """The prediction table behind a source name (raises KeyError for an unknown name, a
    DataError for a bundle that cannot be read)."""
    value = sources()[name]
    if value.startswith(UPLOAD_PREFIX):
        return st.session_state[UPLOADS][name]
    if value.startswith(TABLE_PREFIX):
        return _load_path(value.removeprefix(TABLE_PREFIX), _mtime(value))
    # the whole bundle read and checked here, once: its table and source_bundle() share it
    return _bundle_table(value, _mtime(value), source_bundle(name))


def source_bundle(name: str) -> Bundle | None:
    """The bundle behind a source name, or None for a table (uploaded or in the workspace)."""
    value = sources().get(name)
    if value is None or value.startswith((UPLOAD_PREFIX, TABLE_PREFIX)):
        return None
    return _load_bundle(value, _mtime(value))


def max_upload_bytes() -> int:
    """The upload size limit: $KDCORE_MAX_UPLOAD_MB megabytes (default 200); a DataError with
    the fix unless it is a positive, finite number."""
    text = os.environ.get("KDCORE_MAX_UPLOAD_MB", "200")
    try:
        mb = float(text)
    except ValueError:
        mb = math.nan
    if not (math.isfinite(mb) and mb > 0):
        raise DataError(f"KDCORE_MAX_UPLOAD_MB={text!r} is not a size in megabytes; set it to a "
                        "positive number such as 200 (or unset it for 200) and restart the "
                        "dashboard")
    return int(mb * 1024**2)


def validate_upload(name: str, data: bytes) -> PredictionTable:
    """Validate an uploaded prediction table; raises DataError with the fix."""
    return read_prediction_table(data, name=name, max_bytes=max_upload_bytes())


def keep_upload(name: str, table: PredictionTable, token: str | None = None) -> str:
    """Make an accepted table selectable on every page; returns its source name."""
    label = f"{name} (uploaded)"
    st.session_state.setdefault(UPLOADS, {})[label] = table
    st.session_state.setdefault(UPLOAD_TOKENS, {})[label] = token or hashlib.sha1(
        table.outputs.tobytes()).hexdigest()
    return label


def forget_upload(label: str) -> None:
    st.session_state.get(UPLOADS, {}).pop(label, None)
    st.session_state.get(UPLOAD_TOKENS, {}).pop(label, None)


@st.cache_data(show_spinner=False)
def example_csv(split: str = "test") -> bytes:
    """A valid prediction table (CSV) built from the bundled sample's split."""
    bundle = load_bundle(None)
    names = bundle.class_names
    frame = pd.DataFrame(bundle.teacher_logits(split).round(4),
                         columns=[f"{LOGIT_PREFIX}{c}" for c in names])
    frame.insert(0, "label", [names[i] for i in bundle.y(split)])
    frame.insert(0, "sample_id", [f"{split}-{i}" for i in range(len(frame))])
    frame["split"] = split
    return frame.to_csv(index=False).encode("utf-8")


# ---------------------------------------------------------------- images


def _folder_stamp(path: Path) -> tuple:
    """What changes when images are added to or removed from a folder: its own time and its
    sub-folders' (splits, classes), a few dozen stats at most."""
    stamp = []
    for entry in [path, *sorted(p for p in path.glob("*/") if p.is_dir()),
                  *sorted(p for p in path.glob("*/*/") if p.is_dir())]:
        with contextlib.suppress(OSError):
            stamp.append((str(entry), entry.stat().st_mtime_ns))
    return tuple(stamp)


@st.cache_resource(show_spinner="Reading the image folder…", max_entries=4)
def _image_source(path: str, stamp: tuple) -> ImageSource:
    return open_images(path)


def image_source(path: str | Path) -> ImageSource:
    """The image folder (or CIFAR folder) at ``path`` on the server, checked once per change;
    a DataError with the fix when it is not one."""
    text = str(path).strip()
    folder = Path(text).expanduser().resolve() if text else None
    if folder is None or not folder.exists():
        raise DataError(f"{text or '(empty path)'}: no such folder on the server; give the "
                        "folder that holds train/ and test/ (or a CIFAR python-version folder)")
    return _image_source(str(folder), _folder_stamp(folder))


def folder_stamp(path: str | Path) -> tuple:
    """What changes when images are added to or removed from the folder at ``path``: a cache
    key for work that reads the folder (the Train page's checked image runs)."""
    return _folder_stamp(Path(path))


@st.cache_data(show_spinner=False, max_entries=1024)
def _file_thumbnail(path: str, mtime_ns: int) -> bytes | None:
    image = thumbnails.read_thumbnail(path)
    return None if image is None else thumbnails.png(image)


@st.cache_data(show_spinner=False, max_entries=1024)
def _source_thumbnail(root: str, sample_id: str, stamp: tuple) -> bytes | None:
    try:
        image = image_source(root).load_image(sample_id)
        return thumbnails.png(thumbnails.fit(image))
    except Exception:  # not in the source, or unreadable: shown as missing
        return None


def thumbnail(root: str, sample_id: str) -> bytes | None:
    """PNG thumbnail of one sample of the image source at ``root``: ``<root>/<sample_id>``
    (an image folder), else the source's own reader (CIFAR); None when it cannot be shown."""
    path = thumbnails.image_path(root, sample_id)
    if path is not None:
        try:
            return _file_thumbnail(str(path), path.stat().st_mtime_ns)
        except OSError:
            return None
    try:
        folder = find_cifar_dir(root)  # images inside files, not one file per image
    except DataError:
        folder = None
    if folder is None:
        return None
    return _source_thumbnail(root, str(sample_id), _folder_stamp(folder))


def array_thumbnail(image) -> bytes | None:
    """PNG thumbnail of an image held as an array (a bundle's inputs)."""
    found = thumbnails.array_thumbnail(image)
    return None if found is None else thumbnails.png(found)


@st.cache_data(show_spinner=False)
def missing_thumbnail() -> bytes:
    """The grey square shown where an image cannot be read."""
    return thumbnails.png(thumbnails.placeholder())


def clicked(key: str, memory: str) -> list[int] | None:
    """customdata (integers) of the first point clicked in the chart with widget ``key``, once
    per new click: the selection stays in the session, and a choice made by hand since must
    not be overwritten. ``memory`` is the session key where the last click seen is kept."""
    event = st.session_state.get(key)
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    data = points[0].get("customdata") if points else None
    if isinstance(data, dict):  # a typed array arrives as {"0": v0, "1": v1, ...}
        data = [data[k] for k in sorted(data, key=int)]
    try:
        data = [int(v) for v in (data if isinstance(data, (list, tuple)) else [data])]
    except (TypeError, ValueError):
        data = None
    seen = st.session_state.setdefault(memory, {})
    if seen.get(key) == data:
        return None
    seen[key] = data
    return data


def strategy_label(code: str) -> str:
    """A strategy code with its plain-language name beside it ("kd+be+br · KD, bias removed,
    rectified"); a name that is not (yet) valid, typed into a form, shows as typed."""
    try:
        return f"{code} · {plain_name(code)}"
    except DataError:
        return str(code)


# ---------------------------------------------------------------- ROI measurements

ROI_KEPT = 16  # measurements kept in memory, oldest dropped first


@st.cache_resource(show_spinner=False)
def _roi_measurements() -> dict[tuple, dict]:
    return {}


ROI_ASSUMPTIONS = "roi_assumptions"  # the ROI page's last cost assumptions, for other pages


def roi_assumptions():
    """The cost assumptions last entered on the ROI page in this session, or None (defaults)."""
    return st.session_state.get(ROI_ASSUMPTIONS)


def roi_measurement(bundle_path: str | Path, run_id: str, threads: int = 1, *,
                    measure: bool = True, again: bool = False) -> dict | None:
    """The measured ROI document (default assumptions) of a student run, shared by the ROI page
    and the Overview: timed once, then kept for every session until ``again`` asks for a new
    measurement. With ``measure=False``: the kept one, or None when there is none yet."""
    key = (str(workspace()), str(Path(bundle_path).resolve()), run_id, int(threads))
    kept = _roi_measurements()
    if key in kept and not again:
        return kept[key]
    if not measure:
        return None
    from kdcore.value import roi  # torch: loaded by the pages that measure, not by every page

    with st.spinner("Timing the teacher and the student on this machine…"):
        # an image folder is no bundle: the run itself says how to load its models
        doc = roi.roi(store(), bundle_path if is_bundle(bundle_path) else None, run_id,
                      threads=int(threads))
    kept.pop(key, None)
    kept[key] = doc
    while len(kept) > ROI_KEPT:
        kept.pop(next(iter(kept)))
    return doc


def show_error(exc: BaseException, prefix: str = "") -> None:
    """Show an error as one line (the engine's messages already carry the fix)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(exc, KDCoreError):
        text = f"{type(exc).__name__}: {text}"
    st.error(f"{prefix}{text}", icon=":material/error:")
