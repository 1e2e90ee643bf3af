"""`kdcore export ... --format onnx`: a run's student and a teacher as ONNX files whose outputs
match torch's within 1e-4 and which ONNX Runtime runs at any batch size; what is refused, and
that a refused export writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdcore.cli import main
from kdcore.data.bundles import load_bundle
from kdcore.errors import DataError
from kdcore.learning import export as export_mod
from kdcore.learning.export import export_onnx, onnx_outputs, onnx_session, torch_outputs
from kdcore.learning.models import build_model
from kdcore.learning.teachers import load_teacher
from kdcore.store.runs import RunStore
from kdcore.value.roi import models_for

CLASSES = ["a", "b", "c"]
SIDE = 8


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _matches_torch(file: Path, model: torch.nn.Module, x: np.ndarray) -> None:
    """ONNX Runtime runs ``file`` at batch 1, 7 and 64 and on all of ``x``, within 1e-4."""
    session = onnx_session(file)
    expected = torch_outputs(model, x)
    for batch in (1, 7, 64):
        got = onnx_outputs(session, x[:batch], batch=batch)
        assert got.shape == (min(batch, len(x)), expected.shape[1])
        assert np.abs(got - expected[:batch]).max() < 1e-4, batch
    assert np.abs(onnx_outputs(session, x) - expected).max() < 1e-4


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of 8x8 RGB images: train/ and test/, three classes of eight."""
    root = tmp_path_factory.mktemp("export") / "imgs"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8),
                                "RGB").save(root / split / c / f"{i}.png")
    return root


def _image_inputs(root: Path) -> np.ndarray:
    from kdcore.data.images import open_images

    return next(open_images(root).iter_batches("test", 64))[1]


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model({"type": "cnn", "in_channels": 3, "n_classes": len(CLASSES)}).eval()


# --------------------------------------------------------------------------- a run's student


def test_export_a_run_as_onnx(trained, tmp_path, capsys):
    ws, runs = trained
    run = runs[-1]
    out = tmp_path / "student.onnx"
    code, stdout, err = _run(capsys, "export", run.id, "--format", "onnx", "--out", str(out),
                             "--workspace", str(ws), "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["run"] == run.id and doc["format"] == "onnx" and doc["out"] == str(out)
    bundle = load_bundle(None)
    assert doc["rows_checked"] == len(bundle.x("test")) and doc["batches_checked"] == [1, 64]
    assert 0 <= doc["max_abs_diff"] < 1e-4
    _, student, x = models_for(RunStore(ws).get(run.id), RunStore(ws))
    assert x.shape == bundle.x("test").shape
    _matches_torch(out, student, bundle.x("test"))
    # the text form says what was checked
    code, stdout, _ = _run(capsys, "export", run.id, "--format", "onnx", "--out", str(out),
                           "--workspace", str(ws))
    assert code == 0 and "ONNX Runtime matches torch on 540 rows at batch 1 and 64" in stdout


# --------------------------------------------------------------------------- a teacher


def test_export_the_bundle_teacher_as_onnx(tmp_path, capsys):
    out = tmp_path / "teacher.onnx"
    code, stdout, err = _run(capsys, "export", "--teacher", "--format", "onnx", "--out",
                             str(out), "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["teacher"] == "the teacher of digits_vendor" and doc["out"] == str(out)
    bundle = load_bundle(None)
    _matches_torch(out, load_teacher(bundle), bundle.x("test"))


def test_export_a_zoo_teacher_and_a_torchscript_teacher(images, tmp_path, capsys):
    model = _cnn()
    weights = tmp_path / "cnn.pt"
    torch.save(model.state_dict(), weights)
    script = tmp_path / "cnn.ts"
    torch.jit.save(torch.jit.script(model), str(script))
    x = _image_inputs(images)
    for flags in (["--model", "cnn", "--weights", str(weights)], ["--model-file", str(script)]):
        out = tmp_path / f"{flags[0].strip('-')}.onnx"
        code, stdout, err = _run(capsys, "export", "--teacher", str(images), *flags,
                                 "--format", "onnx", "--out", str(out), "--json")
        assert code == 0, err
        assert json.loads(stdout)["rows_checked"] == len(x) == 24
        _matches_torch(out, model, x)


def _linear() -> torch.nn.Module:
    """A model the dynamo exporter (the slow one, for torch.export programs) takes quickly."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIDE * SIDE,
                                                                   len(CLASSES))).eval()


def test_export_a_torch_export_program_with_a_dynamic_batch(images, tmp_path, capsys):
    model = _linear()
    example = (torch.zeros(2, 3, SIDE, SIDE),)
    dynamic = tmp_path / "dynamic.pt2"
    torch.export.save(torch.export.export(model, example,
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)),
                      dynamic)
    out = tmp_path / "dynamic.onnx"
    code, _, err = _run(capsys, "export", "--teacher", str(images), "--model-file",
                        str(dynamic), "--format", "onnx", "--out", str(out))
    assert code == 0, err
    _matches_torch(out, model, _image_inputs(images))


def test_a_fixed_batch_program_is_refused_and_nothing_is_written(images, tmp_path, capsys):
    model = _linear()
    fixed = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(2, 3, SIDE, SIDE),)), fixed)
    out = tmp_path / "fixed.onnx"
    code, stdout, err = _run(capsys, "export", "--teacher", str(images), "--model-file",
                             str(fixed), "--format", "onnx", "--out", str(out))
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    assert "dynamic_shapes" in err and not out.exists()


def test_outputs_that_differ_from_torch_are_refused(monkeypatch, tmp_path):
    bundle = load_bundle(None)
    teacher = load_teacher(bundle)
    other = build_model(bundle.teacher_spec).eval()  # same shapes, other (random) weights
    real = export_mod.onnx_bytes
    monkeypatch.setattr(export_mod, "onnx_bytes", lambda model, x: real(other, x))
    out = tmp_path / "teacher.onnx"
    out.write_bytes(b"an older export")
    with pytest.raises(DataError, match="differ from torch's"):
        export_onnx(teacher, bundle.x("test"), out)
    assert out.read_bytes() == b"an older export"  # left as it was
    assert [p.name for p in tmp_path.iterdir()] == ["teacher.onnx"]  # no temporary file


@pytest.mark.parametrize("argv, words", [
    (["--teacher", "--format", "state_dict", "--out", "t.pt"], "give --format onnx"),
    (["--teacher", "--format", "onnx", "--out", "t.pt"], "give --out t.onnx"),
    (["--format", "onnx", "--out", "s.onnx"], "give the RUN_ID"),
    (["--teacher", "--model", "cnn", "--weights", "w.pt", "--format", "onnx", "--out",
      "t.onnx"], "give the image folder"),
    (["--teacher", "IMAGES", "--model-file", "t.onnx", "--format", "onnx", "--out", "o.onnx"],
     "is an ONNX model already"),
    (["some-run", "--teacher", "--format", "onnx", "--out", "t.onnx"], "not both"),
    (["some-run", "--model", "cnn", "--format", "onnx", "--out", "t.onnx"],
     "--model is for --teacher"),
])
def test_export_refusals_are_one_line(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = _run(capsys, "export", *argv, "--workspace", str(tmp_path / "ws"))
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    assert words in err
    assert not any(p.suffix == ".onnx" for p in tmp_path.iterdir())
