"""`kdcore predict`, `kdcore analyze IMAGES` and `kdcore export` on a tiny generated image folder.

The teacher is a small linear model saved as TorchScript and as ONNX; its logits are computed
here independently (Pillow -> numpy -> torch) to check the table. Commands run in-process
through ``kdcore.cli.main`` (fast); one end-to-end check runs ``python -m kdcore``.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from kdcore.analysis.analyzer import analyze_path
from kdcore.cli import main
from kdcore.data.tables import read_prediction_table
from kdcore.errors import DataError
from kdcore.learning import predict as predict_module
from kdcore.learning.predict import (
    NORMALIZE_PRESETS,
    Preprocess,
    make_preprocess,
    parse_image_size,
    predict_source,
)
from kdcore.store.runs import RunStore

CLASSES = ["cat", "dog", "fox"]
SIDE = 8
PER_CLASS = 6
N_UNLABELLED = 4


class Tiny(nn.Module):
    """A linear teacher on 8x8 RGB images; its bias makes the classes uneven."""

    def __init__(self, k: int = len(CLASSES)):
        super().__init__()
        self.fc = nn.Linear(3 * SIDE * SIDE, k)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _save_png(path: Path, rng: np.random.Generator, side: int = SIDE, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (side, side, 3) if mode == "RGB" else (side, side)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _make_folder(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in CLASSES:
            for i in range(PER_CLASS):
                _save_png(root / split / c / f"{i:03d}.png", rng)
    for i in range(N_UNLABELLED):
        _save_png(root / "unlabelled" / f"u{i}.png", rng)
    return root


def _model(seed: int = 0, k: int = len(CLASSES)) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny(k).eval()


def _save_torchscript(model: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(model), str(path))
    return path


def _save_onnx(model: nn.Module, path: Path) -> Path:
    x = torch.zeros(2, 3, SIDE, SIDE)
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(image folder, TorchScript file, ONNX file, the model)."""
    base = tmp_path_factory.mktemp("predict")
    root = _make_folder(base / "imgs")
    model = _model()
    return root, _save_torchscript(model, base / "teacher.ts"), \
        _save_onnx(model, base / "teacher.onnx"), model


def _expected_logits(root: Path, sample_ids, model: nn.Module) -> np.ndarray:
    """The model's logits computed here: Pillow -> numpy in [0, 1] -> torch."""
    x = np.stack([np.asarray(Image.open(root / s).convert("RGB"), dtype=np.float32)
                  .transpose(2, 0, 1) / 255.0 for s in sample_ids])
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_predict_writes_a_table_that_analyze_accepts(assets, tmp_path, capsys, kind):
    root, ts, onnx, model = assets
    out = tmp_path / "preds.parquet"
    code, stdout, err = _run(capsys, "predict", str(root), "--model-file",
                             str(ts if kind == "torchscript" else onnx), "--out", str(out),
                             "--batch-size", "5", "--quiet", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    n_labelled = len(CLASSES) * PER_CLASS
    assert doc["splits"] == {"train": n_labelled, "unlabelled": N_UNLABELLED, "test": n_labelled}
    assert doc["n_images"] == 2 * n_labelled + N_UNLABELLED
    assert doc["n_classes"] == len(CLASSES)
    assert doc["out"] == str(out) and doc["images_per_second"] > 0
    assert set(doc) == {"out", "n_images", "splits", "n_classes", "model", "seconds",
                        "images_per_second"}

    meta = pq.read_schema(out).metadata
    assert meta[b"kdcore.image_root"].decode() == str(root.resolve())
    assert meta[b"kdcore.image_kind"] == b"folder"
    assert json.loads(meta[b"kdcore.preprocess"])["normalize"] == "none"
    assert pq.read_schema(out).field("logit_cat").type == "float"

    table = read_prediction_table(out)
    assert table.image_root == str(root.resolve())
    assert table.class_names == CLASSES
    ids = list(table.sample_id)
    assert ids[0] == "train/cat/000.png" and "unlabelled/u0.png" in ids
    assert all((root / s).is_file() for s in ids)
    assert {s: int((table.split == s).sum()) for s in table.splits} == doc["splits"]
    labelled = table.labels >= 0
    assert [CLASSES[i] for i in table.labels[labelled]] == [s.split("/")[1] for s in
                                                             np.array(ids)[labelled]]
    np.testing.assert_allclose(table.outputs, _expected_logits(root, ids, model), atol=1e-4)

    analysed = analyze_path(out)
    assert analysed["n_samples"] == 2 * n_labelled
    assert set(analysed["splits"]) == {"train", "unlabelled", "test"}
    assert analysed["splits"]["unlabelled"]["n_samples"] == N_UNLABELLED
    assert not list(tmp_path.glob(".*tmp"))


def test_analyze_images_equals_predict_then_analyze_and_reuses_the_predictions(
        assets, tmp_path, capsys):
    root, ts, _, _ = assets
    ws = tmp_path / "ws"
    out = tmp_path / "preds.parquet"
    assert _run(capsys, "predict", str(root), "--model-file", str(ts), "--out", str(out),
                "--quiet")[0] == 0
    code, stdout, err = _run(capsys, "analyze", str(out), "--json", "--workspace", str(ws))
    assert code == 0, err
    by_table = json.loads(stdout)

    code, stdout, err = _run(capsys, "analyze", str(root), "--model-file", str(ts), "--json",
                             "--quiet", "--workspace", str(ws))
    assert code == 0, err
    by_images = json.loads(stdout)
    cached = Path(by_images["predictions"])
    assert cached.parent == ws.resolve() / "predictions" and cached.is_file()
    assert by_images["source"] == root.name
    for key in ("n_samples", "teacher_accuracy", "bias_rate", "per_class", "error_confusion",
                "top_confusions", "splits", "likely_label_errors"):
        assert by_images[key] == by_table[key], key

    stamp = cached.stat().st_mtime_ns
    assert _run(capsys, "analyze", str(root), "--model-file", str(ts), "--json", "--quiet",
                "--workspace", str(ws))[0] == 0
    assert cached.stat().st_mtime_ns == stamp  # reused, not predicted again
    code, stdout, _ = _run(capsys, "analyze", str(root), "--model-file", str(ts), "--json",
                           "--quiet", "--workspace", str(ws), "--normalize", "cifar10")
    assert code == 0 and json.loads(stdout)["predictions"] != str(cached)  # other options

    code, stdout, err = _run(capsys, "analyze", str(root), "--workspace", str(ws))
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "--model-file" in err and "--weights" in err


def test_a_workspace_inside_the_image_folder_does_not_defeat_the_reuse(assets, tmp_path,
                                                                       capsys):
    root = tmp_path / "imgs"
    shutil.copytree(assets[0], root)
    argv = ["analyze", str(root), "--model-file", str(assets[1]), "--json", "--quiet",
            "--workspace", str(root / ".kdcore")]
    code, stdout, err = _run(capsys, *argv)
    assert code == 0, err
    cached = Path(json.loads(stdout)["predictions"])
    stamp = cached.stat().st_mtime_ns
    assert json.loads(_run(capsys, *argv)[1])["predictions"] == str(cached)
    assert cached.stat().st_mtime_ns == stamp
    _save_png(root / "test" / "cat" / "new.png", np.random.default_rng(5))
    code, stdout, _ = _run(capsys, *argv)
    doc = json.loads(stdout)
    assert doc["predictions"] != str(cached)  # a new image: predicted anew
    assert doc["splits"]["test"]["n_samples"] == len(CLASSES) * PER_CLASS + 1


def test_predict_normalises_with_a_preset(assets, tmp_path, capsys):
    root, ts, _, model = assets
    out = tmp_path / "preds.parquet"
    assert _run(capsys, "predict", str(root), "--model-file", str(ts), "--out", str(out),
                "--normalize", "cifar100", "--quiet")[0] == 0
    table = read_prediction_table(out)
    mean, std = (np.array(v, dtype=np.float32)[:, None, None] for v in
                 NORMALIZE_PRESETS["cifar100"])
    x = np.stack([(np.asarray(Image.open(root / s).convert("RGB"), dtype=np.float32)
                   .transpose(2, 0, 1) / 255.0 - mean) / std for s in table.sample_id])
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(table.outputs, expected, atol=1e-4)
    meta = json.loads(pq.read_schema(out).metadata[b"kdcore.preprocess"])
    assert meta["mean"] == list(NORMALIZE_PRESETS["cifar100"][0])


def test_predict_with_a_zoo_architecture_and_weights(assets, tmp_path, capsys):
    from kdcore.learning.model_files import image_architectures
    from kdcore.learning.models import build_model

    root = assets[0]
    arch = "resnet8x4" if "resnet8x4" in image_architectures() else image_architectures()[0]
    torch.manual_seed(0)
    net = build_model({"type": arch, "n_classes": len(CLASSES), "in_channels": 3}).eval()
    weights = tmp_path / "w.pt"
    torch.save(net.state_dict(), weights)
    out = tmp_path / "preds.parquet"
    code, stdout, err = _run(capsys, "predict", str(root), "--model", arch, "--weights",
                             str(weights), "--out", str(out), "--image-size", "32", "--quiet",
                             "--json")
    assert code == 0, err
    table = read_prediction_table(out)
    x = np.stack([np.asarray(Image.open(root / s).convert("RGB").resize((32, 32),
                                                                          Image.BILINEAR),
                             dtype=np.float32).transpose(2, 0, 1) / 255.0
                  for s in table.sample_id])
    with torch.no_grad():
        expected = net(torch.from_numpy(x))
    expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()
    np.testing.assert_allclose(table.outputs, expected, atol=1e-4)
    assert arch in json.loads(stdout)["model"]


def test_an_interrupted_predict_leaves_no_file(assets, tmp_path, monkeypatch):
    from kdcore.data.images import open_images

    monkeypatch.setattr(predict_module, "ROW_GROUP_VALUES", 1)  # write every batch
    source = open_images(assets[0])
    model = assets[3]
    calls = []

    def predictor(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    out = tmp_path / "preds.parquet"
    with pytest.raises(KeyboardInterrupt):
        predict_source(source, predictor, out, batch_size=4)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_preprocessing_options_are_checked():
    assert parse_image_size("32") == (32, 32)
    assert parse_image_size("24,40") == (24, 40)
    for bad in ("0", "a", "1,2,3", "-4"):
        with pytest.raises(DataError, match="--image-size"):
            parse_image_size(bad)
    custom = make_preprocess(mean="0.5,0.5,0.5", std="0.25,0.25,0.25")
    assert custom.normalize == "custom" and custom.std == (0.25, 0.25, 0.25)
    x = np.ones((1, 3, 2, 2), dtype=np.float32)
    np.testing.assert_allclose(custom.apply(x), 2.0)
    with pytest.raises(DataError, match="--mean and --std"):
        make_preprocess(mean="0.5")
    with pytest.raises(DataError, match="not both"):
        make_preprocess(normalize="imagenet", mean="0.5", std="0.5")
    with pytest.raises(DataError, match="greater than 0"):
        make_preprocess(mean="0.5", std="0")
    with pytest.raises(DataError, match="channels"):
        make_preprocess(normalize="imagenet").apply(np.ones((1, 1, 2, 2), dtype=np.float32))
    assert Preprocess().apply(x) is x


# ----------------------------------------------------------------------------- bad inputs


def _empty_class(root: Path) -> None:
    for f in (root / "train" / "dog").iterdir():
        f.unlink()


def _corrupt_image(root: Path) -> None:
    (root / "test" / "fox" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def _mixed_sizes(root: Path) -> None:
    _save_png(root / "train" / "cat" / "000.png", np.random.default_rng(1), side=SIDE + 4)


def _test_class_missing_from_train(root: Path) -> None:
    _save_png(root / "test" / "owl" / "000.png", np.random.default_rng(2))


@pytest.mark.parametrize("damage, words", [
    (_empty_class, "dog"),
    (_corrupt_image, "002.png"),
    (_mixed_sizes, "size"),
    (_test_class_missing_from_train, "owl"),
])
def test_bad_image_folder_exits_2_with_one_line_and_no_file(assets, tmp_path, capsys, damage,
                                                             words):
    root = tmp_path / "imgs"
    shutil.copytree(assets[0], root)
    damage(root)
    out = tmp_path / "preds.parquet"
    code, stdout, err = _run(capsys, "predict", str(root), "--model-file", str(assets[1]),
                             "--out", str(out), "--quiet")
    assert code == 2, err
    assert stdout == "" and err.count("\n") == 1 and err.startswith("error: ")
    assert words in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


def test_mixed_sizes_predict_with_image_size(assets, tmp_path, capsys):
    root = tmp_path / "imgs"
    shutil.copytree(assets[0], root)
    _mixed_sizes(root)
    code, _, err = _run(capsys, "predict", str(root), "--model-file", str(assets[2]), "--out",
                        str(tmp_path / "p.parquet"), "--image-size", str(SIDE), "--quiet")
    assert code == 0, err


class _Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_cifar_pickle_exits_2_and_runs_nothing(assets, tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "batches.meta").write_bytes(pickle.dumps(
        {b"label_names": [b"a", b"b", b"c"], b"x": _Exploit(marker)}, protocol=2))
    data = {b"data": np.zeros((2, 3 * 32 * 32), np.uint8), b"labels": [0, 1]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(data, protocol=2))
    out = tmp_path / "preds.parquet"
    code, stdout, err = _run(capsys, "predict", str(folder), "--model-file", str(assets[1]),
                             "--out", str(out), "--quiet")
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_a_teacher_with_another_class_count_exits_2(assets, tmp_path, capsys, kind):
    model = _model(k=len(CLASSES) + 2)
    file = (_save_torchscript(model, tmp_path / "t5.ts") if kind == "torchscript"
            else _save_onnx(model, tmp_path / "t5.onnx"))
    out = tmp_path / "preds.parquet"
    code, stdout, err = _run(capsys, "predict", str(assets[0]), "--model-file", str(file),
                             "--out", str(out), "--quiet")
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert "5" in err and "3" in err
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_bad_model_flags_exit_2(assets, tmp_path, capsys):
    root, ts = assets[0], assets[1]
    out = tmp_path / "p.parquet"
    for argv in (["--model", "resnet8x4"], ["--weights", str(ts)],
                 ["--model-file", str(ts), "--model", "resnet8x4"],
                 ["--model-file", str(tmp_path / "missing.ts")],
                 ["--model-file", str(ts), "--mean", "0.5"]):
        code, _, err = _run(capsys, "predict", str(root), *argv, "--out", str(out), "--quiet")
        assert code == 2 and err.count("\n") == 1, (argv, err)
    assert not out.exists()
    code, _, err = _run(capsys, "predict", str(root), "--model-file", str(ts), "--out",
                        str(tmp_path / "nowhere" / "p.parquet"), "--quiet")
    assert code == 2 and "nowhere" in err


def test_model_flags_on_a_table_exit_2(assets, tmp_path, capsys):
    code, _, err = _run(capsys, "analyze", "--model-file", str(assets[1]), "--workspace",
                        str(tmp_path / "ws"))
    assert code == 2 and err.count("\n") == 1 and "image folder" in err


# ----------------------------------------------------------------------------- export


@pytest.fixture
def finished_run(tmp_path):
    """(workspace, run id, the student's state dict) of a done run with student.pt."""
    ws = tmp_path / "ws"
    store = RunStore(ws)
    run_id = store.create({"strategy": "ce", "seed": 0}, status="done")
    torch.manual_seed(0)
    state = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).state_dict()
    torch.save(state, store.artifact_dir(run_id) / "student.pt")
    return ws, run_id, state


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors"])
def test_export_round_trips(finished_run, tmp_path, capsys, fmt):
    ws, run_id, state = finished_run
    out = tmp_path / f"student.{'pt' if fmt == 'state_dict' else 'safetensors'}"
    code, stdout, err = _run(capsys, "export", run_id[:-2], "--format", fmt, "--out", str(out),
                             "--workspace", str(ws), "--json")
    assert code == 0, err
    assert json.loads(stdout) == {"run": run_id, "format": fmt, "out": str(out)}
    if fmt == "state_dict":
        loaded = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file

        loaded = load_file(out)
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v)


def test_export_refuses_unknown_unfinished_and_weightless_runs(finished_run, tmp_path, capsys):
    ws, run_id, _ = finished_run
    store = RunStore(ws)
    queued = store.create({"strategy": "kd", "seed": 1})
    (store.artifact_dir(run_id) / "student.pt").unlink()
    out = tmp_path / "w.pt"
    for rid, words in (("20990101-000000-abcdef", "no run"), (queued, "queued"),
                       (run_id, "student.pt")):
        code, stdout, err = _run(capsys, "export", rid, "--format", "state_dict", "--out",
                                 str(out), "--workspace", str(ws))
        assert code == 2 and stdout == "" and err.count("\n") == 1, err
        assert words in err
    assert not out.exists()


# ----------------------------------------------------------------------------- end to end


def test_predict_then_analyze_end_to_end_in_a_subprocess(assets, tmp_path):
    root, _, onnx, _ = assets
    out = tmp_path / "preds.parquet"
    env = {**os.environ, "KDCORE_HOME": str(tmp_path / "ws")}
    done = subprocess.run([sys.executable, "-m", "kdcore", "predict", str(root), "--model-file",
                           str(onnx), "--out", str(out)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "images" in done.stdout and str(out) in done.stdout
    done = subprocess.run([sys.executable, "-m", "kdcore", "analyze", str(out), "--json"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["n_samples"] == 2 * len(CLASSES) * PER_CLASS


def test_grey_images_of_mixed_sizes_stay_grey_when_resized(tmp_path, capsys):
    """Grey images of two sizes, resized with --image-size, reach a one-channel teacher with
    one channel (they were converted to RGB when the sizes differed)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "grey"
    for split in ("train", "test"):
        for c in CLASSES:
            for i in range(PER_CLASS):
                _save_png(root / split / c / f"{i:03d}.png", rng, side=SIDE + 2 * (i % 2),
                          mode="L")
    torch.manual_seed(0)
    grey = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, len(CLASSES))).eval()
    model_file = _save_torchscript(grey, tmp_path / "grey.ts")
    code, _, err = _run(capsys, "predict", str(root), "--model-file", str(model_file), "--out",
                        str(tmp_path / "p.parquet"), "--image-size", str(SIDE), "--quiet")
    assert code == 0, err
    assert len(pd.read_parquet(tmp_path / "p.parquet")) == 2 * len(CLASSES) * PER_CLASS
