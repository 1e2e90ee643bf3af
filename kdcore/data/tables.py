"""Prediction tables: load a CSV or Parquet file of teacher outputs and validate it strictly.

The contract (see docs/design.md, "Data contracts"): one row per sample with

* ``label``: a class index (0..K-1) or a class name; it may be empty only on rows whose
  ``split`` is ``unlabelled``;
* the teacher's outputs as ``logit_<class>`` columns or ``prob_<class>`` columns (one kind per
  file; the column order is the class order and the suffixes are the class names);
* optionally ``split`` (``train``, ``unlabelled`` or ``test``) and ``sample_id`` (unique);
* nothing else, unless the caller allows it through ``extra_columns``.

Every problem a user can cause raises :class:`kdcore.errors.DataError` with a one-line message
that names the file, the column and, where it applies, the first offending row, and the fix.

Row numbers: "data row N" counts data rows from 1 and does not count the header. In a
spreadsheet that shows the header as row 1, data row N is spreadsheet row N + 1.

The format is detected from the content, never from the file name: a file that starts with the
Parquet magic bytes ``PAR1`` is read as Parquet, anything else as UTF-8 CSV (comma-separated,
one header row). This module imports only numpy, pandas and pyarrow.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, Protocol, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kdcore.errors import DataError

__all__ = [
    "IMAGE_ROOT_KEY",
    "SPLITS",
    "FileColumns",
    "PredictionTable",
    "check_unique_columns",
    "data_error",
    "display_name",
    "is_index_column",
    "iter_parquet_chunks",
    "numeric_or_fail",
    "read_frame",
    "read_prediction_table",
    "show_value",
    "validate_frame",
]

SPLITS: tuple[str, ...] = ("train", "unlabelled", "test")
# Parquet schema-metadata key holding the absolute image folder of a ``kdcore predict`` table.
IMAGE_ROOT_KEY = "kdcore.image_root"
LOGIT_PREFIX = "logit_"
PROB_PREFIX = "prob_"
PROB_TOLERANCE = 1e-3
# Values per tile when the (K, n) column buffer is transposed to rows (1 MiB of float32).
_TRANSPOSE_TILE_VALUES = 1 << 18
DEFAULT_MAX_BYTES = 200 * 1024**2

_RESERVED = ("label", "split", "sample_id")
_INDEX_NAMES = ("index", "__index_level_0__")
_PARQUET_MAGIC = b"PAR1"
_UTF8_BOM = b"\xef\xbb\xbf"
_INT_RE = re.compile(r"[+-]?\d+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")
_BINARY_MAGIC = {
    b"\xff\xfe": "UTF-16 text; save it as UTF-8 CSV",
    b"\xfe\xff": "UTF-16 text; save it as UTF-8 CSV",
    b"PK\x03\x04": "a ZIP archive or an Excel .xlsx workbook; save it as CSV UTF-8 or Parquet",
    b"\xd0\xcf\x11\xe0": "an old Excel .xls workbook; save it as CSV UTF-8 or Parquet",
    b"\x1f\x8b": "gzip-compressed; decompress it first",
    b"\x89PNG": "a PNG image; upload the predictions table instead",
    b"%PDF": "a PDF document; upload the predictions table instead",
    b"\x93NUMPY": "a NumPy .npy array; save the outputs as CSV or Parquet",
}
_ALLOWED_TEXT = (
    "allowed columns are label, split, sample_id and logit_<class> or prob_<class> columns"
)
_OUTPUTS_FIX = (
    "every logit_/prob_ cell needs a finite number; drop the row or re-export the outputs"
)


# --------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True, eq=False)
class PredictionTable:
    """A validated prediction table. Compare tables field by field (arrays have no ``==``)."""

    source: str
    class_names: list[str]
    outputs: np.ndarray
    kind: Literal["logits", "probabilities"]
    labels: np.ndarray
    split: np.ndarray | None
    sample_id: np.ndarray | None
    extra: pd.DataFrame | None
    # Where the images of an image-folder table live (``kdcore predict`` stores it in the
    # Parquet schema metadata under IMAGE_ROOT_KEY), so the drill-down can show them.
    image_root: str | None = None

    @property
    def n_samples(self) -> int:
        return int(self.outputs.shape[0])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def probabilities(self) -> bool:
        """True when the outputs are probabilities (``prob_`` columns), False for logits."""
        return self.kind == "probabilities"

    @property
    def splits(self) -> list[str]:
        """The splits present, in the order train, unlabelled, test ([] without a split column)."""
        if self.split is None:
            return []
        present = set(pd.unique(self.split))
        return [s for s in SPLITS if s in present]

    def subset(self, split: str) -> PredictionTable:
        """The rows of one split (possibly none) as a new table."""
        if split not in SPLITS:
            raise data_error(
                self.source,
                f"unknown split {show_value(split)}",
                f"ask for one of {', '.join(SPLITS)}.",
            )
        if self.split is None:
            raise data_error(
                self.source,
                f"there is no split column, so there is no {split!r} subset",
                "add a split column with train, unlabelled or test on every row.",
            )
        mask = self.split == split
        return PredictionTable(
            source=self.source,
            class_names=list(self.class_names),
            outputs=self.outputs[mask],
            kind=self.kind,
            labels=self.labels[mask],
            split=self.split[mask],
            sample_id=None if self.sample_id is None else self.sample_id[mask],
            extra=None if self.extra is None else self.extra[mask].reset_index(drop=True),
            image_root=self.image_root,
        )


# --------------------------------------------------------------------------------------------
# Public entry points


def read_prediction_table(
    source: str | Path | bytes | BinaryIO,
    *,
    name: str | None = None,
    extra_columns: Collection[str] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> PredictionTable:
    """Load and validate a prediction table from a path, raw bytes or a binary file object.

    ``name`` is the name shown in messages (for uploads: the original file name); it is never
    used as a path. Parquet is recognised by its magic bytes, anything else is read as UTF-8
    CSV. Raises :class:`DataError` for every problem in the input.
    """
    display = display_name(source, name)
    extra = frozenset(extra_columns)
    df, layout = read_frame(
        source, display, lambda names: _plan_columns(names, display, extra), max_bytes=max_bytes
    )
    return _build(df, layout, _Context(display, image_root=df.attrs.get(IMAGE_ROOT_KEY)))


def validate_frame(
    df: pd.DataFrame,
    *,
    source: str,
    extra_columns: Collection[str] = (),
    column_names: Mapping[str, str] | None = None,
) -> PredictionTable:
    """Validate an in-memory DataFrame against the prediction-table contract.

    ``source`` is the name used in messages. Rows are numbered by position (data row 1 is the
    first row), whatever the DataFrame's index. ``column_names`` is what messages call the
    contract's columns when the user's file names them otherwise (a tabular file's label
    column, e.g. ``{"label": "y"}``); the frame itself uses the contract's names.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError("validate_frame needs a pandas DataFrame")
    display = _one_line(str(source)) or "table"
    layout = _plan_columns(list(df.columns), display, frozenset(extra_columns))
    return _build(df, layout, _Context(display, names=dict(column_names or {})))


def iter_parquet_chunks(
    path: str | Path,
    *,
    batch_rows: int = 1_000_000,
    name: str | None = None,
    extra_columns: Collection[str] = (),
) -> Iterator[PredictionTable]:
    """Stream a (huge) Parquet prediction table as validated chunks of at most ``batch_rows``.

    Only the contract's columns are read. Each chunk is validated like ``validate_frame`` with
    row numbers counted from the start of the file; ``sample_id`` uniqueness is checked across
    chunks, and the label convention (indices or names) is fixed by the first labelled chunk.
    Column problems are raised by this call, row problems when the chunk is reached.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    display = display_name(path, name)
    p = Path(path)
    if _file_size(p, display) == 0:
        raise _empty(display)
    if _read_head(p, display) != _PARQUET_MAGIC:
        raise data_error(
            display,
            "is not a Parquet file",
            "stream only Parquet files; read CSV files with read_prediction_table.",
        )
    try:
        # pre_buffer=False: the default keeps every row group's bytes until the read ends
        pf = pq.ParquetFile(str(p), pre_buffer=False)
        names = pf.schema_arrow.names
        n_rows = pf.metadata.num_rows
        image_root = _image_root(pf.schema_arrow)
    except Exception as exc:
        raise _unreadable_parquet(display, exc) from None
    try:
        layout = _plan_columns(names, display, frozenset(extra_columns))
        if n_rows == 0:
            raise _no_rows(display)
    except DataError:
        pf.close()
        raise
    return _iter_chunks(pf, layout, display, batch_rows, image_root)


# --------------------------------------------------------------------------------------------
# Shared readers and checks (kdcore.data.tabular reads its files with these too)


class FileColumns(Protocol):
    """A file's column names, checked by the caller of :func:`read_frame`."""

    def to_read(self) -> list[str] | None:
        """The columns to read, in order; None reads every column."""

    def csv_types(self, *, as_text: bool) -> dict[str, pa.DataType]:
        """Types of CSV columns (the others are inferred). ``as_text`` is the second try after
        a cell did not convert: numeric columns as text, so the checks can name that cell."""


_C = TypeVar("_C", bound=FileColumns)


def read_frame(
    source: str | Path | bytes | BinaryIO,
    display: str,
    plan: Callable[[list[object]], _C],
    *,
    max_bytes: int | None = None,
) -> tuple[pd.DataFrame, _C]:
    """A CSV or Parquet file (a path, raw bytes or a binary file object) as a DataFrame.

    ``plan`` checks the column names (raising DataError) before any row is read and says what
    to read. Parquet is recognised by its magic bytes, anything else is read as UTF-8 CSV
    (comma-separated, one header row); nothing is unpickled. Every problem of the file is a
    DataError naming ``display``; ``max_bytes`` (None: no limit) caps the size.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        size = _file_size(path, display)
        _check_size(size, max_bytes, display)
        if size == 0:
            raise _empty(display)
        if _read_head(path, display) == _PARQUET_MAGIC:
            return _parquet_frame(str(path), display, plan)
        data = _read_path(path, display)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_size(len(data), max_bytes, display)
    elif hasattr(source, "read"):
        data = _read_stream(source, display, max_bytes)
    else:
        raise TypeError(f"read_frame cannot read a {type(source).__name__}")

    if not data or (len(data) <= 1 << 20 and not data.strip()):
        raise _empty(display)
    if data[:4] == _PARQUET_MAGIC:
        return _parquet_frame(pa.BufferReader(data), display, plan)
    return _csv_frame(data, display, plan)


def check_unique_columns(names: Sequence[object], source: str) -> None:
    """Raise a DataError naming the first column name that appears twice."""
    seen: set[object] = set()
    for col in names:
        if col in seen:
            raise data_error(
                source,
                "the column name appears more than once",
                "give every column a unique name.",
                column=col,
            )
        seen.add(col)


def is_index_column(col: object) -> bool:
    """Whether a column name looks like a row index that pandas saved (index=True)."""
    low = str(col).strip().lower()
    return low == "" or low.startswith("unnamed:") or low in _INDEX_NAMES


def numeric_or_fail(
    ser: pd.Series, column: object, source: str, fix: str, *, offset: int = 0
) -> np.ndarray:
    """A column that is not typed as numbers, as float64 (empty cells NaN), or a DataError
    naming its first cell that is not a number, with ``fix``. ``offset``: rows before ``ser``
    (chunked reads)."""
    dtype = ser.dtype
    if (
        pd.api.types.is_bool_dtype(dtype)
        or pd.api.types.is_datetime64_any_dtype(dtype)
        or pd.api.types.is_timedelta64_dtype(dtype)
        or pd.api.types.is_complex_dtype(dtype)
    ):
        present = ~_mask(ser.isna().reset_index(drop=True))
        if present.any():
            i = _first(present)
            _raise_not_number(ser.iloc[i], column, source, fix, offset + i + 1)
        return np.full(len(ser), np.nan)

    text = _as_text(ser, strip=True)
    try:
        values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    except Exception:
        values = np.full(len(text), np.nan)
    suspects = np.flatnonzero(np.isnan(values) & ~_mask(text.isna() | (text == ""), na=True))
    for i in suspects:
        value = text.iloc[i]
        try:
            values[i] = float(value)  # "nan", "1_000", huge integers and the like
        except (TypeError, ValueError, OverflowError):
            _raise_not_number(value, column, source, fix, offset + int(i) + 1)
    return values


def _raise_not_number(value: object, column: object, source: str, fix: str, row: int) -> None:
    raise data_error(
        source,
        f"the value {show_value(value if isinstance(value, str) else str(value))} is not a number",
        fix,
        column=column,
        row=row,
    )


# --------------------------------------------------------------------------------------------
# Messages


def _one_line(text: str) -> str:
    return _CONTROL_RE.sub(" ", text).strip()


def show_value(value: object, limit: int = 60) -> str:
    """A short, one-line, quoted rendering of a user's value."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _detail(exc: BaseException, limit: int = 160) -> str:
    text = _one_line(" ".join(str(exc).split())) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _size(n: int) -> str:
    return f"{n / 1024**2:.1f} MB" if n >= 1024**2 else f"{n} bytes"


def data_error(
    source: str,
    problem: str,
    fix: str,
    *,
    column: object | None = None,
    row: int | None = None,
) -> DataError:
    where = source
    if column is not None:
        where += f", column {show_value(column)}"
    if row is not None:
        where += f", data row {row}"
    return DataError(_one_line(f"{where}: {problem}. Fix: {fix}"))


def _empty(source: str) -> DataError:
    return data_error(
        source,
        "the file is empty",
        "upload a CSV or Parquet file with a header row (label, logit_<class>...) and one row "
        "per sample.",
    )


def _no_rows(source: str) -> DataError:
    return data_error(
        source,
        "the table has a header but no data rows",
        "add one row per sample.",
    )


def _unreadable_parquet(source: str, exc: BaseException) -> DataError:
    return data_error(
        source,
        f"starts like a Parquet file but cannot be read ({_detail(exc)})",
        "export it again with pandas.DataFrame.to_parquet or pyarrow, or upload a CSV.",
    )


def _class_list(class_names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(class_names[:limit])
    return shown + (", …" if len(class_names) > limit else "")


def display_name(source: object, name: str | None) -> str:
    """A file name for messages: the base name only, never a full path."""
    if name is None:
        if isinstance(source, (str, os.PathLike)):
            name = os.fspath(source)
        elif isinstance(getattr(source, "name", None), str):
            name = source.name  # type: ignore[union-attr]
        else:
            name = "uploaded file"
    base = re.split(r"[\\/]", str(name))[-1]
    base = _one_line(base)
    if len(base) > 120:
        base = base[:119] + "…"
    return base or "uploaded file"


# --------------------------------------------------------------------------------------------
# Reading bytes


def _file_size(path: Path, display: str) -> int:
    try:
        if path.is_dir():
            raise data_error(
                display, "is a folder, not a file", "give the path of the CSV or Parquet file."
            )
        return path.stat().st_size
    except FileNotFoundError:
        raise data_error(display, "the file does not exist", "check the path.") from None
    except OSError as exc:
        raise _os_error(display, exc) from None


def _os_error(display: str, exc: OSError) -> DataError:
    return data_error(
        display, f"cannot be read ({_detail(exc)})", "check the path and its permissions."
    )


def _read_head(path: Path, display: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(4)
    except OSError as exc:
        raise _os_error(display, exc) from None


def _read_path(path: Path, display: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _os_error(display, exc) from None


def _check_size(size: int, max_bytes: int | None, display: str) -> None:
    if max_bytes is not None and size > max_bytes:
        raise data_error(
            display,
            f"the file is {_size(size)}, over the {_size(max_bytes)} limit",
            "split it into smaller files, or stream a Parquet file with iter_parquet_chunks.",
        )


def _read_stream(source: BinaryIO, display: str, max_bytes: int | None) -> bytes:
    try:
        data = source.read() if max_bytes is None else source.read(max_bytes + 1)
    except Exception as exc:  # a broken upload stream is still the user's input
        raise data_error(
            display, f"could not be read ({_detail(exc)})", "upload it again."
        ) from None
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("read_frame needs a binary file object")
    data = bytes(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise data_error(
            display,
            f"the file is larger than the {_size(max_bytes)} limit",
            "split it into smaller files, or stream a Parquet file with iter_parquet_chunks.",
        )
    return data


def _binary_kind(head: bytes) -> str | None:
    """Why ``head`` is clearly not CSV text, or None."""
    for magic, what in _BINARY_MAGIC.items():
        if head.startswith(magic):
            return what
    if b"\x00" in head:
        return "binary data"
    controls = sum(1 for b in head if b < 0x20 and b not in (0x09, 0x0A, 0x0C, 0x0D))
    if head and controls / len(head) > 0.05:
        return "binary data"
    return None


def _parquet_frame(
    src: str | pa.BufferReader, display: str, plan: Callable[[list[object]], _C]
) -> tuple[pd.DataFrame, _C]:
    try:
        pf = pq.ParquetFile(src)
        names = pf.schema_arrow.names
        n_rows = pf.metadata.num_rows
    except Exception as exc:
        raise _unreadable_parquet(display, exc) from None
    with pf:
        columns = plan(names)
        if n_rows == 0:
            raise _no_rows(display)
        try:
            table = pf.read(columns=columns.to_read())
            table.validate(full=True)  # e.g. text that is not UTF-8 in a damaged file
            df = table.to_pandas()
            root = _image_root(table.schema)
            if root is not None:
                df.attrs[IMAGE_ROOT_KEY] = root
        except Exception as exc:
            raise _unreadable_parquet(display, exc) from None
    del table
    return df, columns


def _image_root(schema: pa.Schema) -> str | None:
    """The image folder stored in a Parquet schema's metadata, if any (text, else None)."""
    raw = (schema.metadata or {}).get(IMAGE_ROOT_KEY.encode())
    if not raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _csv_frame(
    data: bytes, display: str, plan: Callable[[list[object]], _C]
) -> tuple[pd.DataFrame, _C]:
    what = _binary_kind(data[:8192])
    if what is not None:
        raise data_error(
            display,
            f"is not a CSV or Parquet file (it looks like {what})",
            "use a comma-separated UTF-8 CSV or a Parquet file.",
        )
    start = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    header = _csv_header(data, start, display)
    columns = plan(header)

    if data.count(b'"') % 2:
        raise _unclosed_quote(data, start, display)

    body = pa.py_buffer(data)[start:]
    try:
        table = _arrow_csv(body, columns.csv_types(as_text=False))
    except pa.ArrowInvalid as exc:
        message = str(exc)
        if "CSV conversion error" in message:
            # A cell that is not a number: read the numeric columns as text and let the
            # caller's checks name the column and the row.
            try:
                table = _arrow_csv(body, columns.csv_types(as_text=True))
            except Exception as exc2:
                raise _csv_failure(data, start, len(header), display, exc2) from None
        else:
            raise _csv_failure(data, start, len(header), display, exc) from None
    except Exception as exc:
        raise _csv_failure(data, start, len(header), display, exc) from None

    if table.column_names != header:  # pyarrow read the header differently from csv: recheck
        columns = plan(table.column_names)
    if table.num_rows == 0:
        raise _no_rows(display)
    try:
        df = table.to_pandas()
    except Exception as exc:
        raise data_error(
            display, f"could not be converted ({_detail(exc)})", "re-export the CSV."
        ) from None
    del table
    return df, columns


def _decode(data: bytes, start: int, display: str) -> str:
    try:
        return str(memoryview(data)[start:], "utf-8")
    except UnicodeDecodeError as exc:
        pos = start + exc.start
        line = data.count(b"\n", 0, pos) + 1
        raise data_error(
            display,
            f"is not UTF-8 text (byte 0x{data[pos]:02x} on line {line} cannot be decoded)",
            "save the file as UTF-8 CSV (in Excel: 'CSV UTF-8 (Comma delimited)').",
        ) from None


def _csv_header(data: bytes, start: int, display: str) -> list[str]:
    text = _decode(data, start, display)  # validates the whole file as UTF-8
    end = text.find("\n")
    first = text if end < 0 else text[:end]
    if first.count('"') % 2:  # the first line ends inside a quoted column name
        if data.count(b'"') % 2:
            raise _unclosed_quote(data, start, display)
        _check_one_line_header(text, display)
    del text
    try:
        header = next(csv.reader([first.rstrip("\r")]))
    except (csv.Error, StopIteration) as exc:
        raise data_error(
            display,
            f"the header row cannot be parsed as CSV ({_detail(exc)})",
            "the first line must be the comma-separated column names.",
        ) from None
    if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        sep = "semicolons" if ";" in header[0] else "tabs"
        raise data_error(
            display,
            f"the header is separated by {sep}, not commas",
            "save the file as comma-separated CSV (or Parquet).",
        )
    return header


def _check_one_line_header(text: str, display: str) -> None:
    """Refuse a quoted column name with a line break inside: the header must be the first line
    alone (the line break would end up in a class name)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    names = next(reader, [])
    broken = [n for n in names if "\n" in n or "\r" in n]
    if broken:
        raise data_error(
            display,
            f"the column name holds a line break, so the header runs over lines 1 to "
            f"{reader.line_num}",
            "remove the line break from the column name: the header is the first line alone.",
            column=broken[0],
        )


def _arrow_csv(body: pa.Buffer, types: dict[str, pa.DataType]) -> pa.Table:
    return pacsv.read_csv(
        pa.BufferReader(body),
        read_options=pacsv.ReadOptions(use_threads=True),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types=types,
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    )


def _csv_failure(
    data: bytes, start: int, n_fields: int, display: str, exc: BaseException
) -> DataError:
    """Explain a CSV that pyarrow refused: find the first ragged row, else pass on the reason."""
    ragged = _first_ragged_row(data, start, n_fields)
    if ragged is not None:
        row, line, got = ragged
        return data_error(
            display,
            f"line {line} of the file has {got} fields but the header has {n_fields}",
            "give every row exactly one value per column (quote values that contain commas).",
            row=row,
        )
    return data_error(
        display,
        f"could not be parsed as CSV ({_detail(exc)})",
        "export it again as a comma-separated UTF-8 CSV with one header row.",
    )


def _unclosed_quote(data: bytes, start: int, display: str) -> DataError:
    """An odd number of '"' means a quoted value never ends: name the row where it starts."""
    row = line = None
    try:
        reader = csv.reader(io.StringIO(str(memoryview(data)[start:], "utf-8"), newline=""))
        next(reader, None)
        count = 0
        begins = reader.line_num + 1
        for record in reader:
            if record:
                count += 1
                row, line = count, begins
            begins = reader.line_num + 1
    except (csv.Error, UnicodeDecodeError):
        row = line = None
    where = f" (it opens on line {line} and runs to the end of the file)" if line else ""
    return data_error(
        display,
        f"a quoted value is never closed{where}",
        'close the quote, or write a literal quote inside a quoted value as "".',
        row=row,
    )


def _first_ragged_row(data: bytes, start: int, n_fields: int) -> tuple[int, int, int] | None:
    try:
        text = str(memoryview(data)[start:], "utf-8")
        reader = csv.reader(io.StringIO(text, newline=""))
        next(reader, None)
        row = 0
        for record in reader:
            if not record:  # a blank line: pyarrow skips those too
                continue
            row += 1
            if len(record) != n_fields:
                return row, reader.line_num, len(record)
    except (csv.Error, UnicodeDecodeError):
        return None
    return None


# --------------------------------------------------------------------------------------------
# Columns


@dataclass(frozen=True)
class _Layout:
    kind: Literal["logits", "probabilities"]
    output_columns: tuple[str, ...]
    class_names: tuple[str, ...]
    has_split: bool
    has_sample_id: bool
    extras: tuple[str, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        cols = ["label", *self.output_columns]
        if self.has_split:
            cols.append("split")
        if self.has_sample_id:
            cols.append("sample_id")
        return (*cols, *self.extras)

    def to_read(self) -> list[str]:
        return list(self.columns)

    def csv_types(self, *, as_text: bool) -> dict[str, pa.DataType]:
        out_type = pa.string() if as_text else pa.float64()
        types: dict[str, pa.DataType] = {c: out_type for c in self.output_columns}
        types["label"] = pa.string()
        if self.has_split:
            types["split"] = pa.string()
        if self.has_sample_id:
            types["sample_id"] = pa.string()
        return types


def _plan_columns(names: Sequence[object], source: str, extra_columns: frozenset[str]) -> _Layout:
    """Check the column names and work out the layout; every bad name is a DataError."""
    check_unique_columns(names, source)
    strs = [c for c in names if isinstance(c, str)]
    # The teacher's outputs first: a features file has neither, and its real gap is the logits
    logits = [c for c in strs if c.startswith(LOGIT_PREFIX)]
    probs = [c for c in strs if c.startswith(PROB_PREFIX)]
    if not logits and not probs:
        others = [str(c) for c in names if c not in _RESERVED and c not in extra_columns]
        seen_text = f" (found {_class_list(others, 5)})" if others else ""
        raise data_error(
            source,
            f"there are no teacher-output columns{seen_text}",
            "name the teacher's outputs logit_<class> (raw scores) or prob_<class> "
            "(probabilities), one column per class, e.g. logit_cat, logit_dog; for a features "
            "file with the logits in another file, pass --label-column and --teacher-logits.",
        )
    if "label" not in names:
        near = [c for c in strs if c.strip().lower() == "label"]
        fix = (
            f"rename {show_value(near[0])} to 'label'."
            if near
            else "add a 'label' column with each sample's class (name or index); leave it empty "
            "on rows with split=unlabelled."
        )
        raise data_error(source, "there is no 'label' column", fix)

    if logits and probs:
        raise data_error(
            source,
            f"it mixes logit_ columns ({logits[0]}, ...) and prob_ columns ({probs[0]}, ...)",
            "use one kind per file: all logit_<class> or all prob_<class>.",
        )

    for col in names:
        if col in _RESERVED or col in extra_columns:
            continue
        if isinstance(col, str) and (col.startswith(LOGIT_PREFIX) or col.startswith(PROB_PREFIX)):
            continue
        raise data_error(source, "unknown column", _unknown_fix(col), column=col)

    prefix = LOGIT_PREFIX if logits else PROB_PREFIX
    outputs = logits or probs
    class_names = tuple(c[len(prefix) :] for c in outputs)
    for col, cname in zip(outputs, class_names, strict=True):
        if not cname.strip():
            raise data_error(
                source,
                "the class name after the prefix is empty",
                f"name the column {prefix}<class>, e.g. {prefix}cat.",
                column=col,
            )
    if len(outputs) < 2:
        raise data_error(
            source,
            f"there is only one class ({outputs[0]}); a classifier needs at least two",
            f"add one {prefix}<class> column per class.",
        )
    return _Layout(
        kind="logits" if logits else "probabilities",
        output_columns=tuple(outputs),
        class_names=class_names,
        has_split="split" in names,
        has_sample_id="sample_id" in names,
        extras=tuple(c for c in names if c in extra_columns and c not in _RESERVED),
    )


def _unknown_fix(col: object) -> str:
    if isinstance(col, str):
        low = col.strip().lower()
        if is_index_column(col):
            return (
                "it looks like a saved row index; delete it or write the file with index=False "
                f"({_ALLOWED_TEXT})."
            )
        if low in _RESERVED:
            return f"rename it to {low!r}."
        for prefix in (LOGIT_PREFIX, PROB_PREFIX):
            if low.startswith(prefix):
                target = prefix + col.strip()[len(prefix) :]
                return f"rename it to {target!r} (lower-case prefix, no surrounding spaces)."
    return f"remove or rename it; {_ALLOWED_TEXT}."


# --------------------------------------------------------------------------------------------
# Rows


@dataclass
class _StreamState:
    """What a chunked read must remember between chunks."""

    label_mode: str | None = None  # "index" or "name", fixed by the first labelled chunk
    seen_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))


@dataclass
class _Context:
    source: str
    offset: int = 0  # rows before this frame (chunked reads)
    state: _StreamState | None = None
    names: dict[str, str] = field(default_factory=dict)  # see validate_frame's column_names
    image_root: str | None = None  # see PredictionTable.image_root

    def row(self, position: int) -> int:
        return self.offset + int(position) + 1

    def column(self, name: str) -> str:
        """What messages call the contract's column ``name``."""
        return self.names.get(name, name)


def _iter_chunks(
    pf: pq.ParquetFile, layout: _Layout, display: str, batch_rows: int, image_root: str | None
) -> Iterator[PredictionTable]:
    ctx = _Context(display, 0, _StreamState(), image_root=image_root)
    try:
        batches = pf.iter_batches(batch_size=batch_rows, columns=list(layout.columns))
        while True:
            try:
                batch = next(batches)
                batch.validate(full=True)
                df = batch.to_pandas()
            except StopIteration:
                return
            except Exception as exc:
                raise _unreadable_parquet(display, exc) from None
            del batch
            if len(df) == 0:
                continue
            table = _build(df, layout, ctx)
            ctx.offset += len(df)
            del df
            yield table
    finally:
        pf.close()


def _build(df: pd.DataFrame, layout: _Layout, ctx: _Context) -> PredictionTable:
    """Validate the rows of ``df`` (whose columns are already checked) into a table."""
    if len(df) == 0:
        raise _no_rows(ctx.source)
    split = _parse_split(df["split"], ctx) if layout.has_split else None
    outputs = _parse_outputs(df, layout, ctx)
    unlabelled = split == "unlabelled" if split is not None else np.zeros(len(df), dtype=bool)
    labels = _parse_labels(df["label"], layout.class_names, unlabelled, split, ctx)
    sample_id = _parse_sample_id(df["sample_id"], ctx) if layout.has_sample_id else None
    extra = df[list(layout.extras)].reset_index(drop=True) if layout.extras else None
    return PredictionTable(
        source=ctx.source,
        class_names=list(layout.class_names),
        outputs=outputs,
        kind=layout.kind,
        labels=labels,
        split=split,
        sample_id=sample_id,
        extra=extra,
        image_root=ctx.image_root,
    )


def _is_plain_numeric(dtype: object) -> bool:
    """int, unsigned or float (numpy or pandas nullable); not bool, complex or datetimes."""
    try:
        return (
            not isinstance(dtype, pd.CategoricalDtype)
            and pd.api.types.is_numeric_dtype(dtype)
            and not pd.api.types.is_bool_dtype(dtype)
            and not pd.api.types.is_complex_dtype(dtype)
        )
    except Exception:
        return False


def _as_text(ser: pd.Series, *, strip: bool) -> pd.Series:
    """The column as a pandas "string" Series (missing values are <NA>)."""
    try:
        text = ser.astype("string")
    except Exception:
        values = [None if _is_missing(v) else str(v) for v in ser.to_numpy(dtype=object)]
        text = pd.Series(values, dtype="string")
    text = text.reset_index(drop=True)
    return text.str.strip() if strip else text


def _is_missing(value: object) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # arrays and other containers are values, not missing
        return False


def _mask(values: pd.Series | np.ndarray, na: bool = False) -> np.ndarray:
    if isinstance(values, pd.Series):
        return values.to_numpy(dtype=bool, na_value=na)
    return np.asarray(values, dtype=bool)


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _parse_split(ser: pd.Series, ctx: _Context) -> np.ndarray:
    text = _as_text(ser, strip=False)
    ok = _mask(text.isin(SPLITS))
    if not ok.all():
        i = _first(~ok)
        value = text.iloc[i]
        if value is pd.NA:
            problem = "the split is empty"
        else:
            problem = f"unknown split {show_value(value)}"
        hint = ""
        if value is not pd.NA:
            low = str(value).strip().lower()
            if low in SPLITS:
                hint = f" (write {low!r} exactly)"
            elif low in ("unlabeled", "transfer"):
                hint = " (write 'unlabelled')"
            elif low in ("val", "valid", "validation", "holdout", "eval"):
                hint = " (held-out data is 'test')"
        raise data_error(
            ctx.source,
            problem,
            f"use one of the allowed values: {', '.join(SPLITS)}{hint}.",
            column=ctx.column("split"),
            row=ctx.row(i),
        )
    return text.to_numpy(dtype=object, na_value=None)


def _parse_outputs(df: pd.DataFrame, layout: _Layout, ctx: _Context) -> np.ndarray:
    """The output columns as one (n, K) float32 array, rows in order; first bad cell named.

    Each column is converted straight to float32 into its own contiguous row of a (K, n)
    buffer and checked there while it is in cache; the buffer is then transposed in tiles.
    Writing the columns into the (n, K) result one by one (stride K) was 4x slower.
    """
    n, k = len(df), len(layout.output_columns)
    by_column = np.empty((k, n), dtype=np.float32)
    finite = np.ones(k, dtype=bool)
    for j, col in enumerate(layout.output_columns):
        ser = df[col]
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, named below
            if _is_plain_numeric(ser.dtype):
                by_column[j] = ser.to_numpy(dtype=np.float32, na_value=np.nan)
            else:
                by_column[j] = numeric_or_fail(
                    ser, col, ctx.source, _OUTPUTS_FIX + ".", offset=ctx.offset
                )
        finite[j] = np.isfinite(by_column[j]).all()

    if not finite.all():
        bad_columns = np.flatnonzero(~finite)
        i = min(_first(~np.isfinite(by_column[j])) for j in bad_columns)
        j = next(int(j) for j in bad_columns if not np.isfinite(by_column[j, i]))
        problem = (
            "the value is empty or NaN"
            if np.isnan(by_column[j, i])
            else "the value is infinite or too large for float32 (beyond ±3.4e38)"
        )
        raise data_error(
            ctx.source, problem, _OUTPUTS_FIX + ".", column=layout.output_columns[j], row=ctx.row(i)
        )
    out = _rows_from_columns(by_column)
    del by_column

    if layout.kind == "probabilities":
        negative = out < 0
        if negative.any():
            i = _first(negative.any(axis=1))
            j = _first(negative[i])
            raise data_error(
                ctx.source,
                f"the probability {float(out[i, j]):.6g} is negative",
                "probabilities must be between 0 and 1; export raw scores as logit_<class> "
                "columns instead.",
                column=layout.output_columns[j],
                row=ctx.row(i),
            )
        del negative
        sums = out.sum(axis=1, dtype=np.float64)
        off = np.abs(sums - 1.0) > PROB_TOLERANCE
        if off.any():
            i = _first(off)
            raise data_error(
                ctx.source,
                f"the prob_ columns sum to {sums[i]:.6g}, not 1 (tolerance {PROB_TOLERANCE:g})",
                "normalise each row so its probabilities sum to 1, or export raw scores as "
                "logit_<class> columns instead.",
                row=ctx.row(i),
            )
    return out


def _rows_from_columns(by_column: np.ndarray) -> np.ndarray:
    """Transpose a (K, n) array to a C-ordered (n, K) one, a cache-sized tile at a time."""
    k, n = by_column.shape
    out = np.empty((n, k), dtype=by_column.dtype)
    step = max(1, _TRANSPOSE_TILE_VALUES // k)
    for start in range(0, n, step):
        out[start : start + step] = by_column[:, start : start + step].T
    return out


def _int_class_names(class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """If every class name is an integer, (sorted values, their class indices)."""
    if not all(_INT_RE.fullmatch(c) for c in class_names):
        return None
    values = np.array([float(int(c)) for c in class_names])
    if len(np.unique(values)) != len(values):
        return None
    order = np.argsort(values)
    return values[order], order.astype(np.int64)


def _parse_labels(
    ser: pd.Series,
    class_names: Sequence[str],
    unlabelled: np.ndarray,
    split: np.ndarray | None,
    ctx: _Context,
) -> np.ndarray:
    n = len(ser)
    k = len(class_names)
    # Work on the distinct values (a handful, even for millions of rows), then spread back.
    try:
        ucode, uniques = pd.factorize(ser.reset_index(drop=True), use_na_sentinel=True)
    except TypeError:  # unhashable values (lists...): compare their text
        ucode, uniques = pd.factorize(_as_text(ser, strip=False), use_na_sentinel=True)
    uniques = pd.Series(uniques)
    u_text = _as_text(uniques, strip=True)
    if _is_plain_numeric(uniques.dtype):
        u_nums = uniques.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        try:
            u_nums = pd.to_numeric(u_text, errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan
            )
        except Exception:
            u_nums = np.full(len(u_text), np.nan)
    u_str = u_text.to_numpy(dtype=object, na_value=None)
    u_name = pd.Index(list(class_names), dtype=object).get_indexer(u_str).astype(np.int64)
    # one more slot, at the end, for the missing values (factorize's code -1)
    ucode = np.where(ucode < 0, len(uniques), ucode)
    empty = np.append(_mask(u_text.isna() | (u_text == ""), na=True), True)[ucode]
    nums = np.append(u_nums, np.nan)[ucode]
    codes = np.append(u_name, -1)[ucode]
    u_str = np.append(u_str, "")

    missing = empty & ~unlabelled
    if missing.any():
        i = _first(missing)
        where = f"its split is {split[i]!r}" if split is not None else "there is no split column"
        raise data_error(
            ctx.source,
            f"the label is empty but {where}",
            "fill in the class (name or index), or set split to 'unlabelled' for transfer "
            "data without labels.",
            column=ctx.column("label"),
            row=ctx.row(i),
        )

    labels = np.full(n, -1, dtype=np.int64)
    has = ~empty
    if not has.any():
        return labels
    with np.errstate(invalid="ignore"):
        intlike = has & np.isfinite(nums) & (nums == np.floor(nums))

    def fail(i: int, problem: str, fix: str) -> DataError:
        return data_error(ctx.source, problem, fix, column=ctx.column("label"), row=ctx.row(i))

    def shown(i: int) -> str:
        return show_value(str(u_str[ucode[i]]))

    numbered = _int_class_names(class_names)
    if numbered is not None:
        # Class names that are numbers: a label names its class by value, so "3", 3 and 3.0
        # all mean class "3" (for names 0..K-1 this is the same as an index).
        values, index = numbered
        pos = np.searchsorted(values, nums[intlike]).clip(0, k - 1)
        found = values[pos] == nums[intlike]
        labels[np.flatnonzero(intlike)[found]] = index[pos[found]]
        bad = has & (labels < 0)
        if bad.any():
            i = _first(bad)
            raise fail(
                i,
                f"the label {shown(i)} is not one of the classes ({_class_list(class_names)})",
                "the class names here are numbers (from the logit_/prob_ suffixes), so labels "
                "must be one of them.",
            )
        return labels

    index_ok = intlike & (nums >= 0) & (nums < k)
    name_ok = codes >= 0
    state = ctx.state
    if state is not None and state.label_mode is not None:
        mode = state.label_mode
    elif index_ok[has].all():
        mode = "index"  # every label is an integer in 0..K-1
    elif name_ok[has].all():
        mode = "name"
    else:  # neither works: complain in the convention the column seems to use
        numeric = has & np.isfinite(nums)
        mode = "index" if numeric[has].all() else "name"

    ok = index_ok if mode == "index" else name_ok
    bad = has & ~ok
    if bad.any():
        i = _first(bad)
        names = _class_list(class_names)
        if mode == "index" and name_ok[i]:
            raise fail(
                i,
                f"the label {shown(i)} is a class name, but earlier rows use class indices",
                f"use one convention in the whole file: indices 0..{k - 1} or class names.",
            )
        if mode == "name" and index_ok[i]:
            raise fail(
                i,
                f"the label {shown(i)} is a class index, but other rows use class names",
                f"use one convention in the whole file: class names ({names}) or indices "
                f"0..{k - 1}.",
            )
        if mode == "index":
            raise fail(
                i,
                f"the label {shown(i)} is not a class index 0..{k - 1} nor a class name ({names})",
                "use a class index or one of the class names from the logit_/prob_ suffixes.",
            )
        raise fail(
            i,
            f"the label {shown(i)} is not a class name ({names}) nor a class index 0..{k - 1}",
            "use one of the class names from the logit_/prob_ suffixes (exact spelling), or "
            "class indices on every row.",
        )
    if state is not None:
        state.label_mode = mode
    if mode == "index":
        labels[has] = nums[has].astype(np.int64)
    else:
        labels[has] = codes[has]
    return labels


def _parse_sample_id(ser: pd.Series, ctx: _Context) -> np.ndarray:
    ser = ser.reset_index(drop=True)
    if _is_plain_numeric(ser.dtype):
        empty = _mask(ser.isna())
    else:
        text = _as_text(ser, strip=True)
        empty = _mask(text.isna() | (text == ""), na=True)
    if empty.any():
        i = _first(empty)
        raise data_error(
            ctx.source,
            "the sample_id is empty",
            "give every row a unique sample_id, or drop the sample_id column.",
            column="sample_id",
            row=ctx.row(i),
        )
    try:
        keys = ser
        codes, _ = pd.factorize(keys, use_na_sentinel=True)
    except TypeError:  # unhashable values (lists...): compare their text
        keys = _as_text(ser, strip=False)
        codes, _ = pd.factorize(keys, use_na_sentinel=True)

    def repeated(i: int, where: str) -> DataError:
        return data_error(ctx.source, f"sample_id {show_value(str(ser.iloc[i]))} {where}",
                          "make every sample_id unique (or drop the sample_id column).",
                          column="sample_id", row=ctx.row(i))

    dup = pd.Series(codes).duplicated(keep="first").to_numpy(dtype=bool)
    if dup.any():
        i = _first(dup)
        raise repeated(i, f"repeats data row {ctx.row(_first(codes == codes[i]))}")
    state = ctx.state
    if state is not None:
        # Across chunks: compare 64-bit hashes of the ids seen so far (8 bytes per row).
        try:
            hashes = pd.util.hash_pandas_object(keys, index=False).to_numpy(dtype=np.uint64)
        except TypeError:
            hashes = pd.util.hash_pandas_object(_as_text(keys, strip=False), index=False)
            hashes = hashes.to_numpy(dtype=np.uint64)
        if len(state.seen_ids):
            pos = np.searchsorted(state.seen_ids, hashes).clip(0, len(state.seen_ids) - 1)
            again = state.seen_ids[pos] == hashes
            if again.any():
                raise repeated(_first(again), "already appeared in an earlier row")
        state.seen_ids = np.sort(np.concatenate([state.seen_ids, hashes]))
    return ser.to_numpy()
