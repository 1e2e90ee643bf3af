"""A model written out for use elsewhere (``kdcore export``).

Three formats: a torch state dict (``torch.save``, loads with ``torch.load(weights_only=True)``)
and safetensors (no pickle at all, loads in any framework with a safetensors reader), either of
which loads back into kdcore as ``--model ARCH --weights FILE``; and ONNX, the whole model with
a dynamic batch axis, for ONNX Runtime or any other ONNX runtime.

ONNX comes from torch's TorchScript-based exporter (``dynamo=False`` with ``dynamic_axes``):
on this CPU build it takes a second where the dynamo exporter takes ten, and gives a dynamic
batch for modules and TorchScript programs alike. A torch.export program (``.pt2``) cannot be
traced that way, so it goes through the dynamo exporter with a dynamic batch dimension. Before
an ONNX file is kept, ONNX Runtime runs it at batch 1 and in batches of :data:`CHECK_BATCH`
on the rows given, and its outputs must match torch's (:data:`TOLERANCE`).

A file is written whole or not at all: into a temporary file beside ``out``, then renamed over
it, so an existing file is replaced (as ``--out`` promises) but never left half-written.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn

from kdcore.errors import DataError
from kdcore.learning.models import read_weights

if TYPE_CHECKING:
    from kdcore.learning.predict import Preprocess

SUFFIXES = {"state_dict": (".pt", ".pth"), "safetensors": (".safetensors",), "onnx": (".onnx",)}
WEIGHT_FORMATS = ("state_dict", "safetensors")
FORMATS = (*WEIGHT_FORMATS, "onnx")
INPUT, OUTPUT = "input", "logits"
CHECK_BATCH = 64
# float32 kernels differ between torch and ONNX Runtime: outputs agree to about 1e-6 of their
# scale; more than this means the graph computes something else.
TOLERANCE = 1e-4


def export_weights(state_dict_file: Path, out: Path,
                   fmt: Literal["state_dict", "safetensors"]) -> Path:
    """Write the state dict in ``state_dict_file`` (a run's ``student.pt``) to ``out`` in
    ``fmt``; returns ``out``. A DataError for an unknown format, a suffix that the loader would
    not read as that format, a missing folder, or a file that is not a state dict."""
    if fmt not in WEIGHT_FORMATS:
        raise DataError(f"unknown export format {fmt!r} for weights; use one of "
                        f"{list(WEIGHT_FORMATS)} (onnx needs the model: export_onnx)")
    out = check_out(out, fmt)
    state = read_weights(state_dict_file, fix="train the run again to export it")
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DataError(f"{state_dict_file}: not a state dict of tensors; train the run again "
                        "to export it")
    # Own, contiguous CPU copies: safetensors refuses views and tensors sharing memory.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with _replacing(out) as tmp:
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
    return out


def check_out(out: str | Path, fmt: str) -> Path:
    """``out`` as a Path, once its suffix says ``fmt`` and its folder exists (DataError)."""
    if fmt not in SUFFIXES:
        raise DataError(f"unknown export format {fmt!r}; use one of {list(FORMATS)}")
    out = Path(out)
    if out.suffix.lower() not in SUFFIXES[fmt]:
        raise DataError(f"{out}: a {fmt} file is named *{' or *'.join(SUFFIXES[fmt])}, so "
                        f"kdcore and other tools read it as {fmt}; give --out "
                        f"{out.with_suffix(SUFFIXES[fmt][0]).name}")
    if not out.parent.is_dir():
        raise DataError(f"{out}: the folder {out.parent} does not exist; create it or give "
                        "another --out")
    if out.is_dir():
        raise DataError(f"{out}: is a folder; give --out a file name")
    return out


@contextlib.contextmanager
def _replacing(out: Path) -> Iterator[str]:
    """A temporary file beside ``out`` to write; renamed over ``out`` when the block ends
    without an error, removed otherwise."""
    handle, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- ONNX


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No exporter chatter: its progress lines would break ``--json`` on stdout, and its
    warnings (deprecations, torchvision ops it skips) say nothing about this model."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_log.setLevel(level)


def onnx_bytes(model: nn.Module, example: np.ndarray | torch.Tensor) -> bytes:
    """``model`` as an ONNX model with a dynamic batch axis, traced in eval mode on
    ``example`` (rows of real input; two are enough). A DataError names what failed."""
    x = torch.as_tensor(np.ascontiguousarray(example[:2]), dtype=torch.float32)
    program = isinstance(model, torch.fx.GraphModule)  # a torch.export program's module
    try:
        with _quiet():
            if program:
                batch = torch.export.Dim("batch")
                exported = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                             input_names=[INPUT], output_names=[OUTPUT],
                                             dynamic_shapes=({0: batch},))
                return exported.model_proto.SerializeToString()
            buffer = io.BytesIO()
            torch.onnx.export(model.eval(), (x,), buffer, dynamo=False, input_names=[INPUT],
                              output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
            return buffer.getvalue()
    except Exception as exc:  # an op with no ONNX translation, a data-dependent shape
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"the model cannot be exported to ONNX ({line[:300]}); export it as "
                        "state_dict or safetensors instead") from None


def onnx_session(model: bytes | str | Path, threads: int | None = 1):
    """An ONNX Runtime session on the CPU with ``threads`` intra-op threads (one inter-op)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


def onnx_outputs(session, x: np.ndarray, batch: int = CHECK_BATCH) -> np.ndarray:
    """The first output of ``session`` on ``x``, run ``batch`` rows at a time."""
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def torch_outputs(model: nn.Module, x: np.ndarray, batch: int = CHECK_BATCH) -> np.ndarray:
    """The model's logits on ``x`` (a tuple's first tensor, a dict's ``logits``)."""
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out = model(torch.as_tensor(np.ascontiguousarray(x[i:i + batch]),
                                        dtype=torch.float32))
            if isinstance(out, dict):
                out = out.get("logits", next(iter(out.values())))
            elif isinstance(out, (tuple, list)):
                out = out[0]
            outs.append(out.float().numpy())
    return np.concatenate(outs)


def export_onnx(model: nn.Module, x: np.ndarray, out: str | Path) -> dict:
    """Write ``model`` to ``out`` as ONNX, checked first: ONNX Runtime runs it on every row of
    ``x`` at batch 1 (the first row) and in batches of :data:`CHECK_BATCH`, and each output
    must be within :data:`TOLERANCE` of torch's, scaled by the logits' size. Returns
    ``{out, rows_checked, batches_checked, max_abs_diff}``; nothing is written on a failure."""
    out = check_out(out, "onnx")
    if len(x) == 0:
        raise DataError("no input rows to check the ONNX file on; give data with a test split")
    batches = sorted({1, min(len(x), CHECK_BATCH)})
    try:  # torch first: a program saved with a fixed batch fails here, before the export
        expected = torch_outputs(model, x)
        torch_outputs(model, x[:1], batch=1)
        data = onnx_bytes(model, x)
        session = onnx_session(data, threads=None)
        got = onnx_outputs(session, x)
        first = onnx_outputs(session, x[:1], batch=1)
    except DataError:
        raise
    except Exception as exc:  # a program with a fixed batch, an op ONNX Runtime does not run
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"the model does not run at batch {' and '.join(map(str, batches))} "
                        f"({line[:300]}); a torch.export program needs a dynamic batch: "
                        "torch.export.export(model, (x,), dynamic_shapes=({0: "
                        "torch.export.Dim('batch')},))") from None
    diff = float(max(np.abs(got - expected).max(), np.abs(first - expected[:1]).max()))
    scale = max(1.0, float(np.abs(expected).max()))
    if not diff <= TOLERANCE * scale:
        raise DataError(f"the ONNX model's outputs differ from torch's by {diff:.3g} (more than "
                        f"{TOLERANCE:g} x {scale:.3g}); {out} was not written")
    with _replacing(out) as tmp:
        Path(tmp).write_bytes(data)
    return {"out": str(out), "rows_checked": int(len(x)), "batches_checked": batches,
            "max_abs_diff": diff}


def teacher_for_export(data: str | Path | None = None, *, arch: str | None = None,
                       weights: str | Path | None = None, model_file: str | Path | None = None,
                       preprocess: Preprocess | None = None) -> tuple[nn.Module, np.ndarray, str]:
    """The teacher ``kdcore export --teacher`` writes, real inputs to trace and check it on,
    and its description.

    Without model flags: the teacher of the bundle ``data`` (default: the sample), from its
    manifest's architecture and weights, checked on the bundle's test split. With ``--model
    ARCH --weights FILE`` or ``--model-file FILE.ts|.pt2``: that model, checked on up to
    :data:`CHECK_BATCH` test images of the image folder or CIFAR folder ``data``, prepared
    with ``preprocess`` (their size and channels are the model's input).
    """
    from kdcore.learning.model_files import load_torch_model

    if arch is None and weights is None and model_file is None:
        from kdcore.data.bundles import load_bundle
        from kdcore.learning.teachers import load_teacher

        bundle = load_bundle(data)
        teacher = load_teacher(bundle)
        if teacher is None:
            raise DataError(f"{bundle.path}: the bundle has no teacher weights to export; give "
                            "the teacher as --model ARCH --weights FILE or --model-file FILE")
        return teacher, bundle.x("test"), f"the teacher of {bundle.name}"
    if model_file is not None and Path(model_file).suffix.lower() == ".onnx":
        raise DataError(f"{model_file}: is an ONNX model already; use it as it is")
    if data is None:
        raise DataError("give the image folder (or CIFAR folder) the teacher reads: "
                        "kdcore export --teacher IMAGES --model ... ; its test images are what "
                        "the ONNX file is traced and checked on")
    from kdcore.data.images import open_images
    from kdcore.learning.predict import Preprocess

    preprocess = preprocess or Preprocess()
    source = open_images(data)
    _, x, _ = next(source.iter_batches("test", CHECK_BATCH, size=preprocess.size,
                                       channels=preprocess.channels))
    x = preprocess.apply(x)
    model = load_torch_model(arch=arch, weights=weights, model_file=model_file,
                             n_classes=len(source.class_names), in_channels=x.shape[1])
    what = f"{arch} + {Path(weights).name}" if model_file is None else Path(model_file).name
    return model, x, what
