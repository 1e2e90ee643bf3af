"""Shared, cached loaders for every dashboard page: the run store, data sources and bundles.

Pages import this module; it holds no UI beyond ``show_error``. Data sources are named by
what a user sees in a selectbox: the bundled sample first, then other bundles found in the
workspace, then accepted uploads (kept in ``st.session_state["data_uploads"]``).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import streamlit as st

from kdcore.data.bundles import Bundle, is_bundle, load_bundle, sample_bundle_path
from kdcore.data.sources import load_predictions
from kdcore.data.tables import LOGIT_PREFIX, PredictionTable, read_prediction_table
from kdcore.errors import DataError, KDCoreError
from kdcore.store.runs import RunStore
from kdcore.workspace import resolve_workspace

UPLOADS = "data_uploads"          # session key: upload display name -> PredictionTable
UPLOAD_TOKENS = "data_upload_tokens"  # session key: upload display name -> content hash
UPLOAD_PREFIX = "upload:"
SAMPLE_LABEL = " (bundled sample)"


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


def sources() -> dict[str, str]:
    """Data source display name -> bundle path, or ``upload:<name>`` for an accepted upload."""
    choices = dict(bundle_choices())
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


def _mtime(path: str) -> float:
    try:
        return (Path(path) / "manifest.json").stat().st_mtime
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
    source_bundle(name)  # the whole bundle checked here, so a later source_bundle() works
    return _load_path(value, _mtime(value))


def source_bundle(name: str) -> Bundle | None:
    """The bundle behind a source name, or None for an uploaded table."""
    value = sources().get(name)
    if value is None or value.startswith(UPLOAD_PREFIX):
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


def show_error(exc: BaseException, prefix: str = "") -> None:
    """Show an error as one line (the engine's messages already carry the fix)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(exc, KDCoreError):
        text = f"{type(exc).__name__}: {text}"
    st.error(f"{prefix}{text}", icon=":material/error:")
