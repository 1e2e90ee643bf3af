"""The zoo's image architectures match mdistiller's (and torchvision's resnet18) layer for layer.

The reference counts below are worked out from the layer definitions in
megvii-research/mdistiller (commit e8c5bb3):
- mdistiller/models/cifar/resnet.py (ResNet, BasicBlock; resnet8..resnet110, resnet8x4,
  resnet32x4),
- mdistiller/models/cifar/wrn.py (WideResNet; wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2),
- mdistiller/models/cifar/mobilenetv2.py (mobile_half = MobileNetV2(T=6, width_mult=0.5)),
- mdistiller/models/cifar/ShuffleNetv2.py (ShuffleV2 = ShuffleNetV2(net_size=1)),
- mdistiller/models/imagenet/resnet.py (resnet18, torchvision's layout: 11,689,512 at 1000
  classes, the figure torchvision publishes).
Each ``ref_*`` function adds up the weights of the Conv2d / BatchNorm2d / Linear layers those
files create, written from the files rather than from kdcore's code; PINNED holds the totals
they give, so both a change to the zoo and a slip in a formula fail.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from kdcore.errors import DataError
from kdcore.learning.models import (
    ARCHITECTURES,
    build_model,
    check_io,
    count_parameters,
    spec_parameters,
)
from kdcore.learning.vision import VISION_ARCHITECTURES


def conv(inp: int, out: int, k: int, groups: int = 1) -> int:
    return inp // groups * out * k * k  # every conv in these files has bias=False


def bn(c: int) -> int:
    return 2 * c


def fc(inp: int, out: int) -> int:
    return inp * out + out


def ref_cifar_resnet(depth: int, filters: list[int], k: int) -> int:
    """resnet.py: conv1 3x3 + bn1; three stages of (depth-2)/6 BasicBlocks (two 3x3 conv+bn,
    a 1x1 conv+bn downsample when stride != 1 or width changes); fc."""
    n = (depth - 2) // 6
    total, inp = conv(3, filters[0], 3) + bn(filters[0]), filters[0]
    for stage, planes in enumerate(filters[1:]):
        for b in range(n):
            total += conv(inp, planes, 3) + bn(planes) + conv(planes, planes, 3) + bn(planes)
            if b == 0 and (stage > 0 or inp != planes):
                total += conv(inp, planes, 1) + bn(planes)
            inp = planes
    return total + fc(filters[3], k)


def ref_resnet18(k: int) -> int:
    """imagenet/resnet.py: conv1 7x7 + bn1; [2, 2, 2, 2] BasicBlocks of 64..512; fc."""
    total, inp = conv(3, 64, 7) + bn(64), 64
    for stage, planes in enumerate([64, 128, 256, 512]):
        for b in range(2):
            total += conv(inp, planes, 3) + bn(planes) + conv(planes, planes, 3) + bn(planes)
            if b == 0 and stage > 0:
                total += conv(inp, planes, 1) + bn(planes)
            inp = planes
    return total + fc(512, k)


def ref_wrn(depth: int, widen: int, k: int) -> int:
    """wrn.py: conv1 3x3 (3->16); three NetworkBlocks of (depth-4)/6 BasicBlocks (bn1, conv1,
    bn2, conv2, a 1x1 convShortcut when in != out); bn1; fc."""
    n = (depth - 4) // 6
    ch = [16, 16 * widen, 32 * widen, 64 * widen]
    total = conv(3, 16, 3)
    for stage in range(3):
        for i in range(n):
            a, out = ch[stage] if i == 0 else ch[stage + 1], ch[stage + 1]
            total += bn(a) + conv(a, out, 3) + bn(out) + conv(out, out, 3)
            total += conv(a, out, 1) if a != out else 0
    return total + bn(ch[3]) + fc(ch[3], k)


def ref_mobile_half(k: int) -> int:
    """mobilenetv2.py, T=6, width 0.5: conv_bn(3, 16); InvertedResiduals (1x1 expand, 3x3
    depthwise, 1x1 project, each with bn); conv_1x1_bn(160, 1280); Linear(1280, k)."""
    settings = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3),
                (6, 320, 1)]
    inp = int(32 * 0.5)
    total = conv(3, inp, 3) + bn(inp)
    for t, c, n in settings:
        out = int(c * 0.5)
        for _ in range(n):
            mid = inp * t
            total += conv(inp, mid, 1) + bn(mid) + conv(mid, mid, 3, mid) + bn(mid)
            total += conv(mid, out, 1) + bn(out)
            inp = out
    return total + conv(inp, 1280, 1) + bn(1280) + fc(1280, k)


def ref_shufflev2(k: int) -> int:
    """ShuffleNetv2.py, net_size 1: conv1 1x1 (3->24) + bn1; per stage a DownBlock (3x3 dw,
    1x1, 1x1, 3x3 dw, 1x1, each with bn) then BasicBlocks on half the channels (1x1, 3x3 dw,
    1x1, each with bn); conv2 1x1 (464->1024) + bn2; linear."""
    total, inp = conv(3, 24, 1) + bn(24), 24
    for out, n in zip((116, 232, 464), (3, 7, 3), strict=True):
        mid = out // 2
        total += conv(inp, inp, 3, inp) + bn(inp) + conv(inp, mid, 1) + bn(mid)
        total += conv(inp, mid, 1) + bn(mid) + conv(mid, mid, 3, mid) + bn(mid)
        total += conv(mid, mid, 1) + bn(mid)
        total += n * (2 * (conv(mid, mid, 1) + bn(mid)) + conv(mid, mid, 3, mid) + bn(mid))
        inp = out
    return total + conv(464, 1024, 1) + bn(1024) + fc(1024, k)


def reference(name: str, k: int) -> int:
    small, x4 = [16, 16, 32, 64], [32, 64, 128, 256]
    if name == "resnet8x4":
        return ref_cifar_resnet(8, x4, k)
    if name == "resnet32x4":
        return ref_cifar_resnet(32, x4, k)
    if name.startswith("wrn_"):
        _, depth, widen = name.split("_")
        return ref_wrn(int(depth), int(widen), k)
    if name == "resnet18":
        return ref_resnet18(k)
    if name == "mobilenetv2":
        return ref_mobile_half(k)
    if name == "shufflenetv2":
        return ref_shufflev2(k)
    return ref_cifar_resnet(int(name.removeprefix("resnet")), small, k)


# The totals the formulas give at 100 classes (resnet18 at 1000); they agree with the sizes
# the CRD and DKD papers list (resnet8x4 1.23M, resnet32x4 7.43M, wrn_40_2 2.26M, wrn_16_2
# 0.70M, resnet56 0.86M, resnet20 0.28M, MobileNetV2 0.81M, ShuffleV2 1.36M).
PINNED = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756,
    "resnet44": 667_188, "resnet56": 861_620, "resnet110": 1_736_564,
    "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "mobilenetv2": 812_836, "shufflenetv2": 1_355_528, "resnet18": 11_689_512,
}


def classes(name: str) -> int:
    return 1000 if name == "resnet18" else 100


@pytest.mark.parametrize("name", sorted(VISION_ARCHITECTURES))
def test_parameter_count_equals_mdistillers_definition(name):
    expected = reference(name, classes(name))
    assert PINNED[name] == expected
    assert spec_parameters({"type": name, "n_classes": classes(name)}) == expected


def test_every_vision_architecture_is_registered_and_pinned():
    assert set(VISION_ARCHITECTURES) <= set(ARCHITECTURES)
    assert set(PINNED) == set(VISION_ARCHITECTURES)


def test_count_follows_the_number_of_classes():
    assert spec_parameters({"type": "resnet8x4", "n_classes": 10}) == reference("resnet8x4", 10)
    assert spec_parameters({"type": "resnet18", "n_classes": 100}) == ref_resnet18(100)


# Layer names of mdistiller's and torchvision's state dicts, so their checkpoints load as saved.
STATE_NAMES = {
    "resnet8x4": ["conv1.weight", "layer1.0.downsample.0.weight", "layer3.0.bn2.running_var",
                  "fc.weight"],
    "wrn_40_2": ["block1.layer.0.convShortcut.weight", "block3.layer.5.bn2.bias", "bn1.weight",
                 "fc.bias"],
    "mobilenetv2": ["conv1.0.weight", "blocks.1.0.conv.3.weight", "blocks.6.0.conv.7.bias",
                    "conv2.1.weight", "classifier.0.weight"],
    "shufflenetv2": ["layer1.0.conv5.weight", "layer2.7.bn3.weight", "conv2.weight",
                     "linear.weight"],
    "resnet18": ["layer4.1.bn2.num_batches_tracked", "layer2.0.downsample.1.running_mean"],
}


@pytest.mark.parametrize("name", sorted(STATE_NAMES))
def test_state_dict_names_match_the_originals(name):
    names = build_model({"type": name, "n_classes": 100}, meta=True).state_dict()
    assert all(key in names for key in STATE_NAMES[name])


FORWARD = ["resnet8x4", "resnet32x4", "resnet20", "resnet56", "wrn_16_2", "wrn_40_2",
           "mobilenetv2", "shufflenetv2"]


@pytest.mark.parametrize("name", FORWARD)
def test_forward_gives_logits_for_cifar_images(name):
    torch.manual_seed(0)
    model = build_model({"type": name, "n_classes": 100}).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()


def test_resnet18_takes_larger_images_and_other_channel_counts():
    model = build_model({"type": "resnet18", "n_classes": 7, "in_channels": 1}).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)
    assert count_parameters(model) == ref_resnet18(7) - conv(3, 64, 7) + conv(1, 64, 7)


def test_a_training_step_changes_the_weights():
    model = build_model({"type": "resnet8", "n_classes": 3})
    before = model.fc.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)),
                                             torch.tensor([0, 1, 2, 0]))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, model.fc.weight)


def test_input_check_accepts_cifar_images():
    check_io({"type": "wrn_40_2", "n_classes": 100}, (3, 32, 32), 100)
    check_io({"type": "resnet18", "n_classes": 10, "in_channels": 1}, (1, 32, 32), 10)


@pytest.mark.parametrize(("spec", "shape", "text"), [
    ({"type": "resnet8x4", "n_classes": 10}, (1, 32, 32), "takes images of 3 channel(s)"),
    ({"type": "resnet8x4", "n_classes": 10}, (3 * 32 * 32,), "C x H x W"),
    ({"type": "resnet18", "n_classes": 10}, (3, 16, 16), "needs at least 32x32"),
    ({"type": "mobilenetv2", "n_classes": 10}, (3, 8, 8), "needs at least 16x16"),
])
def test_input_check_refuses_images_the_network_cannot_take(spec, shape, text):
    with pytest.raises(DataError, match=text.replace("(", r"\(").replace(")", r"\)")) as info:
        check_io(spec, shape, 10)
    assert "\n" not in str(info.value)


def test_bad_options_are_a_data_error():
    with pytest.raises(DataError, match="in_channels"):
        build_model({"type": "resnet20", "n_classes": 10, "in_channels": 0})
    with pytest.raises(DataError, match="bad options"):
        build_model({"type": "wrn_40_2", "n_classes": 10, "depth": 7})


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "mobilenetv2", "shufflenetv2",
                                  "resnet18"])
def test_each_family_compiles_with_torchscript(name):
    """So a user can save a zoo teacher with torch.jit.script as well as torch.jit.trace."""
    model = build_model({"type": name, "n_classes": 10}).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model)
    assert scripted.state_dict().keys() == model.state_dict().keys()
