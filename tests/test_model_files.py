"""Teachers load from every kind of file and give the original model's logits; every bad file
is one DataError line; exported weights load back."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdcore.errors import DataError
from kdcore.learning.export import export_weights
from kdcore.learning.model_files import load_predictor, load_torch_model
from kdcore.learning.models import build_model

ARCH, K, SIZE = "resnet8", 5, 16


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    net = build_model({"type": ARCH, "n_classes": K})
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        net.train()(torch.randn(8, 3, SIZE, SIZE))
    return net.eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(3, 3, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def expected(model, images) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


@pytest.fixture(scope="module")
def files(tmp_path_factory, model, images) -> dict:
    """The same teacher saved every way kdcore reads it."""
    root = tmp_path_factory.mktemp("teachers")
    x = torch.from_numpy(images)
    out = {"pt": root / "weights.pt", "safetensors": root / "weights.safetensors",
           "ts": root / "model.ts", "ts_as_pt": root / "traced.pt", "pt2": root / "model.pt2",
           "onnx": root / "model.onnx", "onnx_batch1": root / "batch1.onnx"}
    torch.save(model.state_dict(), out["pt"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out["safetensors"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
        torch.jit.save(traced, out["ts"])
        torch.jit.save(traced, out["ts_as_pt"])
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)),
                          out["pt2"])
        torch.onnx.export(model, (x,), out["onnx"], dynamo=False, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "n"}})
        torch.onnx.export(model, (x[:1],), out["onnx_batch1"], dynamo=False)
    return out


@pytest.mark.parametrize(("kind", "source"), [
    ("zoo + .pt", {"arch": ARCH, "weights": "pt"}),
    ("zoo + .safetensors", {"arch": ARCH, "weights": "safetensors"}),
    ("TorchScript", {"model_file": "ts"}),
    ("TorchScript saved as .pt", {"model_file": "ts_as_pt"}),
    ("torch.export", {"model_file": "pt2"}),
    ("ONNX", {"model_file": "onnx"}),
    ("ONNX with a fixed batch of 1", {"model_file": "onnx_batch1"}),
])
def test_every_source_gives_the_original_logits(kind, source, files, images, expected):
    args = {k: files[v] if k != "arch" else v for k, v in source.items()}
    predictor = load_predictor(**args, n_classes=K, threads=1)
    logits = predictor(images)
    assert logits.dtype == np.float32 and logits.shape == (len(images), K)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert predictor.description


def test_n_classes_is_read_from_the_weights(files, images):
    assert load_predictor(arch=ARCH, weights=files["pt"])(images).shape == (3, K)


def test_checkpoint_wrappers_and_ddp_prefix_are_unwrapped(tmp_path, model, images, expected):
    wrapped = tmp_path / "ckpt_epoch_240.pth"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state, "epoch": 240, "best_acc": 0.79}, wrapped)
    np.testing.assert_allclose(load_predictor(arch=ARCH, weights=wrapped)(images), expected,
                               atol=1e-5)
    torch.save({"state_dict": model.state_dict()}, wrapped)
    np.testing.assert_allclose(load_predictor(arch=ARCH, weights=wrapped)(images), expected,
                               atol=1e-5)


def test_load_torch_model_gives_a_module_for_torch_sources(files, images, expected):
    zoo = load_torch_model(arch=ARCH, weights=files["pt"])
    assert isinstance(zoo, nn.Module) and sum(p.numel() for p in zoo.parameters()) > 0
    for name in ("ts", "pt2"):
        with torch.no_grad():
            out = load_torch_model(model_file=files[name])(torch.from_numpy(images))
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-4)
    with pytest.raises(DataError, match="ONNX Runtime, not in torch"):
        load_torch_model(model_file=files["onnx"])


class TupleOutput(nn.Module):
    """Returns (logits, feats) as mdistiller's networks do."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x), x.mean()


class NotLogits(nn.Module):
    def forward(self, x):
        return x.sum((1, 2, 3))


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return x.flatten(1)[:, :K] + y


def _script(module: nn.Module, path, *inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(module.eval(), inputs), path)
    return path


def test_a_tuple_output_gives_its_first_tensor(tmp_path, model, images, expected):
    file = _script(TupleOutput(model), tmp_path / "tuple.ts", torch.from_numpy(images))
    np.testing.assert_allclose(load_predictor(model_file=file)(images), expected, atol=1e-4)


def _error(**kwargs) -> str:
    images = kwargs.pop("images", None)
    with pytest.raises(DataError) as info:
        predictor = load_predictor(**kwargs)
        predictor(images if images is not None else np.zeros((2, 3, SIZE, SIZE), np.float32))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_files_are_named(tmp_path):
    assert "no such file" in _error(model_file=tmp_path / "gone.ts")
    assert "no such file" in _error(arch=ARCH, weights=tmp_path / "gone.pt")


def test_unknown_suffixes_are_refused(tmp_path):
    odd = tmp_path / "model.h5"
    odd.write_bytes(b"\x89HDF")
    assert "unknown model file type '.h5'" in _error(model_file=odd)
    assert "not weights" in _error(arch=ARCH, weights=odd)


def test_a_state_dict_given_as_model_file_says_to_use_weights(files):
    for name in ("pt", "safetensors"):
        message = _error(model_file=files[name])
        assert "holds weights (a state dict)" in message and "--weights" in message


def test_a_program_given_as_weights_says_to_use_model_file(files):
    message = _error(arch=ARCH, weights=files["ts_as_pt"])
    assert "a TorchScript program, not weights" in message and "--model-file" in message
    assert "--model-file" in _error(arch=ARCH, weights=files["onnx"])


def test_both_or_neither_source_is_refused(files):
    assert "not both" in _error(arch=ARCH, weights=files["pt"], model_file=files["ts"])
    assert "--model ARCH --weights FILE (both)" in _error(arch=ARCH)


def test_an_unknown_architecture_lists_the_zoo(files):
    message = _error(arch="resnet9000", weights=files["pt"])
    assert "unknown image architecture" in message and "resnet32x4" in message


def test_weights_of_another_architecture_are_refused(files):
    assert "does not fit the architecture" in _error(arch="wrn_16_2", weights=files["pt"])


def test_output_that_is_not_logits_is_refused(tmp_path, images):
    file = _script(NotLogits(), tmp_path / "sum.ts", torch.from_numpy(images))
    assert "not (n, n_classes) logits" in _error(model_file=file)


def test_a_different_number_of_classes_is_refused(files):
    assert "gives 5 logits per image, and the data has 7" in _error(model_file=files["ts"],
                                                                     n_classes=7)
    assert "gives 5 logits per image" in _error(model_file=files["onnx"], n_classes=7)
    assert "the weights give 5 classes" in _error(arch=ARCH, weights=files["pt"], n_classes=7)


@pytest.mark.parametrize(("source", "text"), [
    ({"model_file": "ts"}, "fails on images of shape (2, 4, 16, 16)"),
    ({"model_file": "pt2"}, "it expects (n, 3, 16, 16)"),
    ({"model_file": "onnx"}, "it expects (n, 3, 16, 16)"),
    ({"arch": ARCH, "weights": "pt"}, "takes images of 3 channel(s)"),
])
def test_wrong_input_shape_names_the_file_and_the_expected_shape(files, source, text):
    args = {k: files[v] if k != "arch" else v for k, v in source.items()}
    message = _error(**args, images=np.zeros((2, 4, SIZE, SIZE), np.float32))
    file = files[source.get("model_file", source.get("weights"))]
    assert str(file) in message and text in message


def test_a_program_exported_in_training_mode_is_refused(tmp_path, images):
    model = build_model({"type": ARCH, "n_classes": K}).train()
    file = tmp_path / "train_mode.pt2"
    torch.export.save(torch.export.export(model, (torch.from_numpy(images),)), file)
    assert "was exported in training mode (aten.batch_norm" in _error(model_file=file)


def test_a_module_traced_in_training_mode_is_refused(tmp_path, images):
    model = build_model({"type": ARCH, "n_classes": K}).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.from_numpy(images), check_trace=False)
    torch.jit.save(traced, tmp_path / "train_mode.ts")
    assert "traced in training mode (aten::batch_norm" in _error(
        model_file=tmp_path / "train_mode.ts")


def test_a_scripted_module_follows_eval_mode(tmp_path, model, images, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model.train()), tmp_path / "scripted.ts")
    model.eval()
    np.testing.assert_allclose(load_predictor(model_file=tmp_path / "scripted.ts")(images),
                               expected, atol=1e-4)


def test_onnx_with_two_inputs_is_refused(tmp_path):
    file = tmp_path / "two.onnx"
    x, y = torch.zeros(2, 3, SIZE, SIZE), torch.zeros(2, K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TwoInputs(), (x, y), file, dynamo=False, input_names=["x", "y"])
    assert "takes 2 inputs (x, y)" in _error(model_file=file)


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_malicious_pickle_as_weights_is_refused_without_running(tmp_path, how):
    marker, file = tmp_path / "pwned", tmp_path / "weights.pt"
    if how == "torch.save":
        torch.save({"conv1.weight": Payload(marker)}, file)
    else:
        file.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    message = _error(arch=ARCH, weights=file)
    assert str(file) in message
    assert not marker.exists()


def test_a_damaged_safetensors_file_is_a_data_error(tmp_path):
    file = tmp_path / "broken.safetensors"
    file.write_bytes(b"not really")
    assert "not a readable safetensors file" in _error(arch=ARCH, weights=file)


@pytest.mark.parametrize(("fmt", "name"), [("state_dict", "out.pt"),
                                           ("safetensors", "out.safetensors")])
def test_export_round_trip(tmp_path, model, files, images, expected, fmt, name):
    out = tmp_path / name
    out.write_bytes(b"an older export")  # --out replaces what was there
    assert export_weights(files["pt"], out, fmt) == out
    saved = load_file(out) if fmt == "safetensors" else torch.load(out, weights_only=True)
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    np.testing.assert_allclose(load_predictor(arch=ARCH, weights=out)(images), expected,
                               atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


def test_export_refuses_a_suffix_of_the_other_format_and_a_missing_folder(tmp_path, files):
    with pytest.raises(DataError, match="give --out out.safetensors"):
        export_weights(files["pt"], tmp_path / "out.pt", "safetensors")
    with pytest.raises(DataError, match="does not exist"):
        export_weights(files["pt"], tmp_path / "nowhere" / "out.pt", "state_dict")
    with pytest.raises(DataError, match="unknown export format"):
        export_weights(files["pt"], tmp_path / "out.onnx", "onnx")
