"""The small model zoo for bundled and tabular data, built from a JSON-able spec.

A bundle's manifest names its teacher's and student's architectures as specs such as
``{"type": "mlp", "input_dim": 64, "hidden": [32], "n_classes": 10}``, so a model can be
rebuilt anywhere without pickling code.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from kdcore.errors import DataError
from kdcore.learning.vision import VISION_ARCHITECTURES, input_check


def mlp(*, input_dim: int, hidden: list[int], n_classes: int) -> nn.Module:
    """A ReLU multi-layer perceptron: input_dim -> hidden... -> n_classes logits."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = input_dim
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


CNN_WIDTHS = [32, 64, 128]


def cnn(*, in_channels: int, n_classes: int, widths: list[int] | None = None) -> nn.Module:
    """A small VGG-style CNN for image inputs (C x H x W); global pooling makes it size-agnostic."""
    widths = widths or CNN_WIDTHS
    layers: list[nn.Module] = []
    channels = in_channels
    for width in widths:
        layers += [
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, n_classes)]
    return nn.Sequential(*layers)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn,
                                                      **VISION_ARCHITECTURES}


SIZE_OPTIONS = ("input_dim", "in_channels", "n_classes", "hidden", "widths")


def build_model(spec: dict, *, meta: bool = False) -> nn.Module:
    """Build a model from a spec ``{"type": name, **kwargs}``; a bad spec is a DataError.

    ``meta=True`` builds its shapes only, on torch's meta device: no memory and no
    initialisation, so a spec of any size can be counted (:func:`spec_parameters`) and checked
    (:func:`check_io`, :func:`load_weights`) before anything is trained.
    """
    if not isinstance(spec, dict):
        raise DataError(f"the architecture is {spec!r}; give an object such as "
                        '{"type": "mlp", "input_dim": 64, "hidden": [32], "n_classes": 10}')
    options = dict(spec)
    kind = options.pop("type", None)
    if kind not in ARCHITECTURES:
        raise DataError(
            f"unknown model type {kind!r} in architecture spec; use one of {sorted(ARCHITECTURES)}"
        )
    for key in SIZE_OPTIONS:
        value = options.get(key)
        sizes = value if isinstance(value, list) else [value]
        if key in options and not (value is None and key == "widths") and not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
            raise DataError(f"{kind} option {key} = {value!r}; give positive whole numbers")
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return ARCHITECTURES[kind](**options)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"bad options for model type {kind!r}: {exc}; fix the manifest") from None


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def spec_parameters(spec: dict) -> int:
    """Trainable parameters of a spec's model, counted without building it (a DataError for a
    bad spec); worked out once per spec, however many runs are planned with it."""
    return _parameters(json.dumps(spec, sort_keys=True))


@lru_cache(maxsize=64)
def _parameters(spec: str) -> int:
    return count_parameters(build_model(json.loads(spec), meta=True))


def check_io(spec: dict, input_shape: tuple[int, ...], n_classes: int) -> None:
    """A DataError unless the spec's model takes rows of ``input_shape`` and gives
    ``n_classes`` logits. Worked out from the spec (no model is built or run), so it is cheap
    for a spec of any size."""
    spec_parameters(spec)  # the spec's options are valid
    options = dict(spec)
    kind = options.pop("type")
    INPUT_CHECKS[kind](tuple(input_shape), **options)
    if options["n_classes"] != n_classes:
        raise DataError(f"n_classes is {options['n_classes']}, and the data has {n_classes} "
                        f"classes; give it n_classes {n_classes}")


def _mlp_input(rows: tuple[int, ...], *, input_dim: int, **_) -> None:
    if math.prod(rows) != input_dim:
        raise DataError(f"input_dim is {input_dim}, and the data's rows of shape {rows} hold "
                        f"{math.prod(rows)} values; give it input_dim {math.prod(rows)}")


def _cnn_input(rows: tuple[int, ...], *, in_channels: int, widths: list[int] | None = None,
               **_) -> None:
    if len(rows) != 3 or rows[0] != in_channels:
        raise DataError(f"takes images of {in_channels} channel(s), C x H x W, and the data's "
                        f"rows have shape {rows}; store x as (n, {in_channels}, H, W)")
    pools = len(widths or CNN_WIDTHS)
    if min(rows[1:]) < 2**pools:
        raise DataError(f"halves the images {pools} times, too often for {rows[1]}x{rows[2]}; "
                        "give it fewer widths")


INPUT_CHECKS: dict[str, Callable[..., None]] = {
    "mlp": _mlp_input, "cnn": _cnn_input,
    **{name: input_check(name) for name in VISION_ARCHITECTURES}}


def load_weights(model: nn.Module, file: Path, *, fix: str) -> nn.Module:
    """Load the state dict saved in ``file`` into ``model``, never unpickling code.

    ``model`` may be a meta skeleton (``build_model(spec, meta=True)``): the file is then
    checked against the architecture and nothing is loaded. Every way the file can be wrong is
    one DataError line that ends with ``fix``.
    """
    return fit_weights(model, read_weights(file, fix=fix), file, fix=fix)


def read_weights(file: Path, *, fix: str) -> object:
    """What ``torch.save`` wrote in ``file``, read with ``weights_only=True`` (tensors,
    containers and numbers only, never code); a DataError ending with ``fix`` otherwise."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"{file}: not a plain state dict: it holds pickled objects, which could "
                        f"run code when loaded, so it is not loaded; {fix}") from None
    except Exception as exc:  # whatever torch raises for an unreadable file, it is bad input
        raise DataError(f"{file}: cannot read it ({type(exc).__name__}: "
                        f"{(str(exc).splitlines() or [''])[0]}); {fix}") from None


def fit_weights(model: nn.Module, state: object, file: Path, *, fix: str) -> nn.Module:
    """Load ``state`` (read from ``file``) into ``model`` once it is a state dict whose names
    and shapes are the model's; only checked for a meta skeleton. A DataError otherwise."""
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DataError(f"{file}: not a state dict of tensors; {fix}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = f"no tensor {missing[0]!r}" if missing else f"an unexpected tensor {extra[0]!r}"
        raise DataError(f"{file}: has {what}, so it does not fit the architecture; {fix}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise DataError(f"{file}: {key} has shape {tuple(state[key].shape)}, the "
                            f"architecture needs {tuple(tensor.shape)}; {fix}")
    if not any(t.is_meta for t in expected.values()):
        model.load_state_dict(state)
    return model
