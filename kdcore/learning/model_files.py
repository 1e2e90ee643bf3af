"""Teachers from files: a zoo architecture plus weights, or a whole model saved as a program.

Three sources, so a teacher trained anywhere comes in without kdcore needing its code:

- a zoo architecture (``--model ARCH``) plus weights (``--weights FILE``): a ``.pt``/``.pth``
  state dict read with ``torch.load(weights_only=True)``, never unpickling code, or a
  ``.safetensors`` file. The common checkpoint wrappers ``{"model": sd}`` and
  ``{"state_dict": sd}`` and the ``module.`` prefix that DistributedDataParallel adds are
  unwrapped, so mdistiller's and most training scripts' checkpoints load as saved;
- a program (``--model-file FILE``): TorchScript (``torch.jit.save``, told apart from a state
  dict by its archive's ``code/`` and ``constants.pkl``, whatever its suffix) or torch.export
  (``torch.export.save``, ``.pt2``);
- an ONNX model (``--model-file FILE.onnx``), run with ONNX Runtime on the CPU.

Program and ONNX files are code: loading one runs what its author wrote, so load only files
from people you trust. A model whose forward returns a tuple or list gives its first tensor as
the logits, and one that returns a dict gives ``"logits"`` (else its first tensor), as
mdistiller's ``(logits, feats)`` and Hugging Face's outputs do.
"""

from __future__ import annotations

import inspect
import warnings
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from kdcore.errors import DataError
from kdcore.learning.models import (
    ARCHITECTURES,
    INPUT_CHECKS,
    build_model,
    fit_weights,
    read_weights,
)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
PROGRAM_SUFFIXES = (".ts", ".pt", ".pth", ".jit", ".pt2", ".onnx")
WRAPPERS = ("state_dict", "model")
SAVE_PROGRAM = ("save the model with torch.jit.save(torch.jit.trace(model, x), 'model.ts'), "
                "torch.export.save(torch.export.export(model, (x,)), 'model.pt2') or "
                "torch.onnx.export")


class Predictor(Protocol):
    """A teacher as a function from images to logits, whatever file it came from."""

    description: str

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n, C, H, W) float32 images -> (n, K) float32 logits."""


def image_architectures() -> list[str]:
    """The zoo's architectures that take images and need no option but ``n_classes`` and
    ``in_channels``, so ``--model ARCH`` alone names one."""
    names = []
    for name, factory in ARCHITECTURES.items():
        params = inspect.signature(factory).parameters
        required = {k for k, p in params.items() if p.default is inspect.Parameter.empty}
        if "in_channels" in params and required <= {"n_classes", "in_channels"}:
            names.append(name)
    return sorted(names)


def load_predictor(*, arch: str | None = None, weights: str | Path | None = None,
                   model_file: str | Path | None = None, n_classes: int | None = None,
                   in_channels: int = 3, threads: int | None = None) -> Predictor:
    """The teacher in ``arch`` + ``weights`` or in ``model_file``, ready to predict.

    ``n_classes``, when given, is checked against the model's output; for a zoo architecture
    it is otherwise read from the weights' final layer. ``threads`` caps the CPU threads
    (torch's for the process, ONNX Runtime's intra-op threads for its session). Every way a
    file can be wrong is one DataError line naming the file and the fix.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    source = _source(arch, weights, model_file)
    if source == "onnx":
        return OnnxPredictor(Path(model_file), n_classes=n_classes, threads=threads)
    model, description, expects = _torch_model(arch, weights, model_file, n_classes, in_channels)
    check = partial(INPUT_CHECKS[arch], in_channels=in_channels) if arch is not None else None
    file = Path(weights if weights is not None else model_file)
    return TorchPredictor(model, description=description, file=file, expects=expects,
                          n_classes=n_classes, check=check)


def load_torch_model(*, arch: str | None = None, weights: str | Path | None = None,
                     model_file: str | Path | None = None, n_classes: int | None = None,
                     in_channels: int = 3) -> nn.Module:
    """The teacher as a torch module (to train against, or to fine-tune): a zoo architecture
    with its weights, a TorchScript module or a torch.export program's module. An ONNX file
    is a DataError: ONNX Runtime predicts, it does not give torch a module."""
    if _source(arch, weights, model_file) == "onnx":
        raise DataError(f"{model_file}: an ONNX model runs in ONNX Runtime, not in torch; give "
                        "the teacher as a TorchScript (.ts) or torch.export (.pt2) file, or as "
                        "--model ARCH --weights FILE")
    return _torch_model(arch, weights, model_file, n_classes, in_channels)[0]


def _source(arch, weights, model_file) -> str:
    """Which kind of teacher the arguments name: "zoo", "program" or "onnx"."""
    if model_file is not None and (arch is not None or weights is not None):
        raise DataError("give the teacher either as --model ARCH --weights FILE or as "
                        "--model-file FILE, not both")
    if model_file is None:
        if arch is None or weights is None:
            raise DataError("give the teacher as --model ARCH --weights FILE (both) or as "
                            "--model-file FILE.ts|.pt2|.onnx")
        return "zoo"
    return "onnx" if Path(model_file).suffix.lower() == ".onnx" else "program"


def _torch_model(arch, weights, model_file, n_classes, in_channels) -> tuple[nn.Module, str, str]:
    """The module, its description, and the input it expects, in words."""
    if model_file is None:
        model = _zoo_model(arch, Path(weights), n_classes, in_channels)
        return model.eval(), f"{arch} + {Path(weights).name}", f"(n, {in_channels}, H, W)"
    file = _existing(model_file)
    kind = _archive_kind(file)
    if kind in ("torchscript", "export"):
        return _program(file, kind)
    if kind == "state_dict" or file.suffix.lower() == ".safetensors":
        raise DataError(f"{file}: holds weights (a state dict), not a model program; give it as "
                        f"--model ARCH --weights {file.name}, or {SAVE_PROGRAM}")
    if file.suffix.lower() not in PROGRAM_SUFFIXES:
        raise DataError(f"{file}: unknown model file type {file.suffix!r}; give a TorchScript "
                        "(.ts), torch.export (.pt2) or ONNX (.onnx) file")
    raise DataError(f"{file}: not a TorchScript or torch.export archive; {SAVE_PROGRAM}")


def _program(file: Path, kind: str) -> tuple[nn.Module, str, str]:
    """A TorchScript module or a torch.export program's module, refused when it was saved in
    training mode: a trace fixes the training flag of batch norm and dropout as a constant, and
    an exported program keeps the mode it was exported in, so .eval() would not switch them and
    the predictions would depend on the batch."""
    script = kind == "torchscript"
    what, save, verb = (("TorchScript module", "torch.jit.save", "traced") if script else
                        ("torch.export program", "torch.export.save", "exported"))
    try:
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            loaded = (torch.jit.load(str(file), map_location="cpu") if script
                      else torch.export.load(str(file)))
    except Exception as exc:  # a damaged archive, or one from a newer torch
        raise DataError(f"{file}: cannot load the {what} ({_line(exc)}); save it again with "
                        f"{save}") from None
    training = _traced_training_op(loaded) if script else _training_op(loaded)
    if training:
        raise DataError(f"{file}: was {verb} in training mode ({training} runs with "
                        "training=True), so its predictions would depend on the batch; save it "
                        f"again after model.eval()")
    if script:
        return loaded.eval(), f"TorchScript {file.name}", "the shape it was traced with"
    return loaded.module(), f"torch.export {file.name}", _exported_shape(loaded)


def _zoo_model(arch: str, file: Path, n_classes: int | None, in_channels: int) -> nn.Module:
    """Zoo architecture ``arch`` with the weights in ``file``."""
    names = image_architectures()
    if arch not in names:
        raise DataError(f"unknown image architecture {arch!r} for --model; use one of {names}, "
                        "or give the whole model as --model-file")
    file = _existing(file)
    fix = (f"give weights saved from kdcore's {arch} with torch.save(model.state_dict(), path), "
           "or the whole model as --model-file")
    state = _unwrapped(_read_state(file, fix=fix))
    classes_key = _classes_key(arch, in_channels)
    if isinstance(state, dict) and isinstance(state.get(classes_key), torch.Tensor):
        found = state[classes_key].shape[0]
        if n_classes is not None and found != n_classes:
            raise DataError(f"{file}: the weights give {found} classes ({classes_key}), and the "
                            f"data has {n_classes}; give the teacher trained on these classes")
        n_classes = found
    model = build_model({"type": arch, "n_classes": n_classes or 1, "in_channels": in_channels})
    return fit_weights(model, state, file, fix=fix)


def _read_state(file: Path, *, fix: str) -> object:
    """The tensors in a weights file: safetensors, or a torch.save file read as weights only."""
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise DataError(f"{file}: not a readable safetensors file ({_line(exc)}); "
                            f"{fix}") from None
    if suffix not in WEIGHT_SUFFIXES:
        what = "a model program" if suffix in PROGRAM_SUFFIXES else "an unknown file type"
        raise DataError(f"{file}: {what} ({suffix or 'no suffix'}), not weights; give weights "
                        f"as {', '.join(WEIGHT_SUFFIXES)}, or a program as --model-file")
    kind = _archive_kind(file)
    if kind in ("torchscript", "export"):
        name = "TorchScript" if kind == "torchscript" else "torch.export"
        raise DataError(f"{file}: a {name} program, not weights; give it as --model-file "
                        f"{file.name} (without --model and --weights)")
    return read_weights(file, fix=fix)


def _unwrapped(state: object) -> object:
    """The state dict inside a checkpoint ``{"model": sd}``/``{"state_dict": sd}``, with a
    DistributedDataParallel ``module.`` prefix taken off its names."""
    for key in WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if isinstance(state, dict) and state and all(
            isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _classes_key(arch: str, in_channels: int) -> str:
    """The name of the first tensor whose shape follows n_classes (the final layer's weight):
    the one that differs between skeletons built for 1 and for 2 classes."""
    one, two = ({k: t.shape for k, t in build_model(
        {"type": arch, "n_classes": n, "in_channels": in_channels}, meta=True
    ).state_dict().items()} for n in (1, 2))
    return next(k for k in one if one[k] != two[k])


def _existing(file: str | Path) -> Path:
    file = Path(file)
    if not file.is_file():
        raise DataError(f"{file}: no such file; check the path")
    return file


def _archive_kind(file: Path) -> str | None:
    """"torchscript", "export" or "state_dict" for the zip archives torch writes, by their
    content (their suffix is often .pt for all three); None for anything else."""
    if not zipfile.is_zipfile(file):
        return None
    try:
        with zipfile.ZipFile(file) as archive:
            inner = [name.split("/", 1)[-1] for name in archive.namelist()]
    except (zipfile.BadZipFile, OSError):
        return None
    if any(name == "constants.pkl" or name.startswith("code/") for name in inner):
        return "torchscript"
    if any(name.startswith("models/") and name.endswith(".json") for name in inner):
        return "export"
    if "data.pkl" in inner:
        return "state_dict"
    return None


def _training_op(program) -> str | None:
    """The first operation in a torch.export program run in training mode (batch norm, dropout
    and the like take a ``train``/``training`` flag), or None."""
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for i, argument in enumerate(schema.arguments):
            if argument.name in ("train", "training"):
                value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
                if value is True:
                    return str(node.target)
    return None


# TorchScript operations taking a training flag, and its position: a trace records the flag
# as a constant, so a module traced in training mode stays in it after .eval().
TRACED_TRAINING_FLAGS = {"aten::batch_norm": 5, "aten::dropout": 2, "aten::dropout_": 2,
                         "aten::feature_dropout": 2, "aten::alpha_dropout": 2}


def _traced_training_op(module) -> str | None:
    """The first operation of a TorchScript module fixed in training mode, or None."""
    for node in module.inlined_graph.nodes():
        index = TRACED_TRAINING_FLAGS.get(node.kind())
        if index is not None and node.inputsSize() > index:
            flag = node.inputsAt(index)
            if flag.node().kind() == "prim::Constant" and flag.toIValue() is True:
                return node.kind()
    return None


def _exported_shape(program) -> str:
    """The input shape a torch.export program was exported for, dynamic sizes by name."""
    user = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                return "(" + ", ".join(str(size) if isinstance(size, int) else "n"
                                       for size in value.shape) + ")"
    return "the shape it was exported with"


def _line(exc: BaseException) -> str:
    """An exception as one line: its type and its last non-empty line (where TorchScript's
    interpreter and ONNX Runtime put the actual complaint)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if last.startswith(f"{type(exc).__name__}:") else f"{type(exc).__name__}: {last}"


def _images(x: np.ndarray, file: Path, expects: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise DataError(f"{file}: takes images as (n, C, H, W) and was given shape {x.shape}; "
                        f"it expects {expects}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _logits(out: object, n: int, file: Path, n_classes: int | None) -> np.ndarray:
    """The model's output as (n, K) float32 logits, K checked against ``n_classes``."""
    if isinstance(out, dict):
        out = out.get("logits", next(iter(out.values()), None))
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu().numpy()
    if not isinstance(out, np.ndarray) or out.ndim != 2 or out.shape[0] != n:
        shape = getattr(out, "shape", type(out).__name__)
        raise DataError(f"{file}: gives output of shape {shape} for {n} images, not (n, "
                        "n_classes) logits; save a model whose forward returns the class logits")
    if n_classes is not None and out.shape[1] != n_classes:
        raise DataError(f"{file}: gives {out.shape[1]} logits per image, and the data has "
                        f"{n_classes} classes; give the teacher trained on these classes")
    return np.ascontiguousarray(out, dtype=np.float32)


class TorchPredictor:
    """A torch module (zoo, TorchScript or torch.export) run under ``inference_mode``."""

    def __init__(self, model: nn.Module, *, description: str, file: Path, expects: str,
                 n_classes: int | None, check: Callable[[tuple], None] | None = None):
        self.model, self.description, self.file = model, description, file
        self.expects, self.n_classes, self.check = expects, n_classes, check

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = _images(x, self.file, self.expects)
        if self.check is not None:
            try:
                self.check(tuple(x.shape[1:]))
            except DataError as exc:
                raise DataError(f"{self.file}: {exc}") from None
        try:
            with torch.inference_mode():
                out = self.model(torch.from_numpy(x))
        except (RuntimeError, AssertionError, ValueError, TypeError, IndexError) as exc:
            raise DataError(f"{self.file}: fails on images of shape {x.shape} ({_line(exc)}); "
                            f"it expects {self.expects}") from None
        return _logits(out, len(x), self.file, self.n_classes)


class OnnxPredictor:
    """An ONNX model in an ONNX Runtime CPU session; one input, images (n, C, H, W)."""

    DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(double)": np.float64}

    def __init__(self, file: Path, *, n_classes: int | None, threads: int | None):
        import onnxruntime as ort

        self.file, self.n_classes = _existing(file), n_classes
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.file), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a bad model
            raise DataError(f"{self.file}: not a model ONNX Runtime can load ({_line(exc)}); "
                            "export it again with torch.onnx.export") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise DataError(f"{self.file}: takes {len(inputs)} inputs "
                            f"({', '.join(i.name for i in inputs)}); export a model that takes "
                            "one input, the images (n, C, H, W)")
        self.input = inputs[0]
        if self.input.type not in self.DTYPES:
            raise DataError(f"{self.file}: takes {self.input.type} input, not float images; "
                            "export the model with float32 input")
        self.shape = ["n" if not isinstance(d, int) else d for d in self.input.shape]
        self.expects = "(" + ", ".join(str(d) for d in self.shape) + ")"
        self.description = f"ONNX {self.file.name}"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = _images(x, self.file, self.expects)
        if len(self.shape) != 4 or any(isinstance(d, int) and d != s
                                       for d, s in zip(self.shape[1:], x.shape[1:], strict=True)):
            raise DataError(f"{self.file}: was given images of shape {x.shape}; it expects "
                            f"{self.expects}")
        # A model exported for a fixed batch size (often 1) runs in batches of that size.
        step = self.shape[0] if isinstance(self.shape[0], int) else len(x)
        if len(x) <= step:
            return self._run(x, step)
        return np.concatenate([self._run(x[i:i + step], step) for i in range(0, len(x), step)])

    def _run(self, x: np.ndarray, step: int) -> np.ndarray:
        n = len(x)
        if n < step and isinstance(self.shape[0], int):
            x = np.concatenate([x, np.zeros((step - n, *x.shape[1:]), x.dtype)])
        try:
            out = self.session.run(None, {self.input.name: x.astype(self.DTYPES[self.input.type])})
        except Exception as exc:  # ONNX Runtime's errors are its own types
            raise DataError(f"{self.file}: fails on images of shape {x.shape} ({_line(exc)}); "
                            f"it expects {self.expects}") from None
        return _logits(out, len(x), self.file, self.n_classes)[:n]
