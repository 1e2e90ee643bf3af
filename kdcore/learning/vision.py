"""The image classifiers of the knowledge-distillation literature, in plain torch.nn.

The CIFAR networks are those of mdistiller (megvii-research/mdistiller,
``mdistiller/models/cifar/``) that the DKD paper's tables pair as teacher and student
(resnet32x4 -> resnet8x4, wrn_40_2 -> wrn_16_2, resnet56 -> resnet20, ...), and resnet18 is
torchvision's ImageNet layout. Each has the same layers, parameter counts and state-dict names
as the original, so a checkpoint trained there (mdistiller's teachers, torchvision's weights)
loads here as saved (see :mod:`kdcore.learning.model_files`). Two differences, neither
changing a weight: the forward returns the logits only (mdistiller's also return features),
and the final pooling is global average pooling, which equals mdistiller's fixed-size pooling
on 32x32 images and also takes other sizes.

Every factory takes ``n_classes`` and ``in_channels`` (3 in the originals), so a spec such as
``{"type": "resnet8x4", "n_classes": 100}`` builds one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from kdcore.errors import DataError


def _init(model: nn.Module) -> nn.Module:
    """He initialisation (fan-out) for convolutions and unit BatchNorm, as mdistiller and
    torchvision initialise these networks."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def _conv_bn(inp: int, out: int, kernel: int, stride: int = 1, groups: int = 1,
             relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (He et al. 2016), with a 1x1 convolution on the
    shortcut when the block changes width or stride. Names as in torchvision and mdistiller."""

    def __init__(self, inp: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inp != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inp, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """A ResNet of BasicBlocks: ``blocks[i]`` blocks of width ``widths[i]`` (three stages, or
    four), every stage after the first halving the image. ``imagenet`` picks torchvision's stem
    (7x7 stride-2 convolution and max pooling) over the CIFAR stem (one 3x3 convolution)."""

    def __init__(self, *, in_channels: int, n_classes: int, stem: int, widths: list[int],
                 blocks: list[int], imagenet: bool = False):
        super().__init__()
        kernel, stride = (7, 2) if imagenet else (3, 1)
        self.conv1 = nn.Conv2d(in_channels, stem, kernel, stride, kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet else nn.Identity()
        width = stem
        for i, (planes, n) in enumerate(zip(widths, blocks, strict=True)):
            first = BasicBlock(width, planes, 1 if i == 0 else 2)
            setattr(self, f"layer{i + 1}", nn.Sequential(
                first, *(BasicBlock(planes, planes) for _ in range(n - 1))))
            width = planes
        if len(widths) == 3:  # the CIFAR networks: a fourth stage that does nothing (no weights)
            self.layer4 = nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, n_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int, widths: list[int], *, n_classes: int,
                 in_channels: int = 3) -> nn.Module:
    """mdistiller's CIFAR ResNet (``resnet.py``): depth 6n+2, three stages of n blocks."""
    n = (depth - 2) // 6
    return ResNet(in_channels=in_channels, n_classes=n_classes, stem=widths[0],
                  widths=widths[1:], blocks=[n] * 3)


def resnet18(*, n_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 (11,689,512 parameters at 1000 classes), for images of 32x32
    and up; its state dict loads torchvision's weights."""
    return ResNet(in_channels=in_channels, n_classes=n_classes, stem=64,
                  widths=[64, 128, 256, 512], blocks=[2, 2, 2, 2], imagenet=True)


class WideBlock(nn.Module):
    """The pre-activation block of Wide ResNets (Zagoruyko & Komodakis 2016), names as in
    mdistiller's ``wrn.py``; the shortcut takes the activated input when the width changes."""

    def __init__(self, inp: int, out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inp)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.convShortcut = None if inp == out else nn.Conv2d(inp, out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WideStage(nn.Module):
    """n WideBlocks, kept under ``.layer`` as mdistiller's NetworkBlock does."""

    def __init__(self, n: int, inp: int, out: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*(WideBlock(inp if i == 0 else out, out, stride if i == 0
                                               else 1) for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """mdistiller's WRN-depth-k: depth 6n+4, widths 16k, 32k, 64k."""

    def __init__(self, depth: int, widen: int, *, n_classes: int, in_channels: int = 3):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1)
        self.block2 = WideStage(n, widths[1], widths[2], 2)
        self.block3 = WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], n_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.relu(self.bn1(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection; a residual
    when shape is kept. Layer indices as in mdistiller's ``mobilenetv2.py``."""

    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        mid = inp * expand
        self.residual = stride == 1 and inp == out
        self.conv = nn.Sequential(*_conv_bn(inp, mid, 1), *_conv_bn(mid, mid, 3, stride, mid),
                                  *_conv_bn(mid, out, 1, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


# (expansion t, channels c, blocks n, stride s) of each MobileNetV2 stage (Sandler et al. 2018)
MOBILENETV2_STAGES = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                      (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    """mdistiller's CIFAR MobileNetV2 at width ``width`` (``mobile_half`` is 0.5); the last
    1x1 convolution keeps its 1280 channels at widths up to 1."""

    def __init__(self, width: float, *, n_classes: int, in_channels: int = 3):
        super().__init__()
        channels = int(32 * width)
        self.conv1 = _conv_bn(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in MOBILENETV2_STAGES:
            out = int(c * width)
            self.blocks.append(nn.Sequential(*(
                InvertedResidual(channels if i == 0 else out, out, s if i == 0 else 1, t)
                for i in range(n))))
            channels = out
        last = int(1280 * width) if width > 1 else 1280
        self.conv2 = _conv_bn(channels, last, 1)
        self.classifier = nn.Sequential(nn.Linear(last, n_classes))
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.conv2(x).mean((2, 3)))


def _shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Channel shuffle: interleave the channels of ``groups`` groups."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _ConvBNs(nn.Module):
    """Convolutions conv1, conv2, ... each followed by its bn1, bn2, ... (no bias), named as
    mdistiller's ShuffleNetV2 names them; ``layers`` holds (in, out, kernel, stride, groups)."""

    def __init__(self, layers: list[tuple[int, int, int, int, int]]):
        super().__init__()
        for i, (inp, out, kernel, stride, groups) in enumerate(layers, 1):
            setattr(self, f"conv{i}", nn.Conv2d(inp, out, kernel, stride, kernel // 2,
                                                groups=groups, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(out))


class ShuffleBlock(_ConvBNs):
    """ShuffleNetV2's unit (Ma et al. 2018): half the channels pass, the other half go through
    1x1, 3x3 depthwise and 1x1 convolutions, then the halves are shuffled together."""

    def __init__(self, channels: int):
        half = channels // 2
        super().__init__([(half, half, 1, 1, 1), (half, half, 3, 1, half), (half, half, 1, 1, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, x = x.chunk(2, dim=1)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn3(self.conv3(self.bn2(self.conv2(x)))))
        return _shuffle(torch.cat([kept, x], 1))


class ShuffleDown(_ConvBNs):
    """ShuffleNetV2's downsampling unit: two stride-2 branches, each giving half the output."""

    def __init__(self, inp: int, out: int):
        mid = out // 2
        super().__init__([(inp, inp, 3, 2, inp), (inp, mid, 1, 1, 1),  # left branch
                          (inp, mid, 1, 1, 1), (mid, mid, 3, 2, mid), (mid, mid, 1, 1, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = torch.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = torch.relu(self.bn3(self.conv3(x)))
        right = torch.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return _shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """mdistiller's CIFAR ShuffleNetV2 (``ShuffleV2``, size 1): a 1x1 stem of 24 channels,
    three downsampling stages of 116, 232 and 464 channels, a 1x1 convolution to 1024."""

    def __init__(self, *, n_classes: int, in_channels: int = 3,
                 widths: tuple[int, ...] = (116, 232, 464, 1024),
                 blocks: tuple[int, ...] = (3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        channels = 24
        for i, (out, n) in enumerate(zip(widths[:-1], blocks, strict=True)):
            setattr(self, f"layer{i + 1}", nn.Sequential(
                ShuffleDown(channels, out), *(ShuffleBlock(out) for _ in range(n))))
            channels = out
        self.conv2 = nn.Conv2d(channels, widths[-1], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[-1])
        self.linear = nn.Linear(widths[-1], n_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


CIFAR_RESNETS = {f"resnet{d}": (d, [16, 16, 32, 64]) for d in (8, 14, 20, 32, 44, 56, 110)}
CIFAR_RESNETS |= {"resnet8x4": (8, [32, 64, 128, 256]), "resnet32x4": (32, [32, 64, 128, 256])}
WIDE_RESNETS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1),
                "wrn_40_2": (40, 2)}

VISION_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    **{name: partial(cifar_resnet, *args) for name, args in CIFAR_RESNETS.items()},
    **{name: partial(WideResNet, *args) for name, args in WIDE_RESNETS.items()},
    "mobilenetv2": partial(MobileNetV2, 0.5),
    "shufflenetv2": ShuffleNetV2,
    "resnet18": resnet18,
}

# How many times each network halves the image: it needs images of at least 2**k pixels a side.
DOWNSAMPLINGS = {**dict.fromkeys(CIFAR_RESNETS, 2), **dict.fromkeys(WIDE_RESNETS, 2),
                 "mobilenetv2": 4, "shufflenetv2": 3, "resnet18": 5}


def input_check(name: str) -> Callable[..., None]:
    """The INPUT_CHECKS entry of architecture ``name``: images (C, H, W) with its
    ``in_channels`` and sides of at least 2**(times it halves the image)."""
    smallest = 2 ** DOWNSAMPLINGS[name]

    def check(rows: tuple[int, ...], *, in_channels: int = 3, **_) -> None:
        if len(rows) != 3 or rows[0] != in_channels:
            raise DataError(f"{name} takes images of {in_channels} channel(s), C x H x W, and "
                            f"the data's rows have shape {rows}; store x as (n, {in_channels}, "
                            "H, W) or give the model in_channels to match")
        if min(rows[1:]) < smallest:
            raise DataError(f"{name} halves the images {DOWNSAMPLINGS[name]} times and needs "
                            f"at least {smallest}x{smallest}, and they are {rows[1]}x{rows[2]}; "
                            "resize them or pick a smaller network")

    return check
