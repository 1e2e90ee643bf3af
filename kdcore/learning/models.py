"""The small model zoo for bundled and tabular data, built from a JSON-able spec.

A bundle's manifest names its teacher's and student's architectures as specs such as
``{"type": "mlp", "input_dim": 64, "hidden": [32], "n_classes": 10}``, so a model can be
rebuilt anywhere without pickling code.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kdcore.errors import DataError


def mlp(*, input_dim: int, hidden: list[int], n_classes: int) -> nn.Module:
    """A ReLU multi-layer perceptron: input_dim -> hidden... -> n_classes logits."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = input_dim
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def cnn(*, in_channels: int, n_classes: int, widths: list[int] | None = None) -> nn.Module:
    """A small VGG-style CNN for image inputs (C x H x W); global pooling makes it size-agnostic."""
    widths = widths or [32, 64, 128]
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


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn}


def build_model(spec: dict) -> nn.Module:
    """Build a model from a spec ``{"type": name, **kwargs}``; unknown types are a DataError."""
    options = dict(spec)
    kind = options.pop("type", None)
    if kind not in ARCHITECTURES:
        raise DataError(
            f"unknown model type {kind!r} in architecture spec; use one of {sorted(ARCHITECTURES)}"
        )
    try:
        return ARCHITECTURES[kind](**options)
    except TypeError as exc:
        raise DataError(f"bad options for model type {kind!r}: {exc}; fix the manifest") from None


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
