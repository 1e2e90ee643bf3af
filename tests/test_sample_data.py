"""The bundled sample: small, rebuildable bit for bit, and the regime the issue asks for."""

import importlib.util
import json
from pathlib import Path

import numpy as np

from kdcore.bundles import load_bundle, sample_bundle_path

ROOT = Path(__file__).resolve().parents[1]


def _build_module():
    spec = importlib.util.spec_from_file_location(
        "build_digits_vendor", ROOT / "sample_data" / "build_digits_vendor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_is_under_5_mb():
    total = sum(f.stat().st_size for f in sample_bundle_path().rglob("*") if f.is_file())
    assert total < 5 * 1024**2


def test_build_script_reproduces_the_shipped_teacher(tmp_path):
    manifest = _build_module().build(tmp_path / "rebuilt", seed=0)
    shipped = json.loads((sample_bundle_path() / "manifest.json").read_text())
    assert manifest["teacher"]["test_accuracy"] == shipped["teacher"]["test_accuracy"]
    with np.load(tmp_path / "rebuilt" / "data.npz") as new, \
            np.load(sample_bundle_path() / "data.npz") as old:
        for key in old.files:
            assert np.allclose(new[key], old[key], atol=1e-5), key


def test_teacher_weights_reproduce_the_shipped_logits():
    bundle = load_bundle()
    import torch

    with torch.no_grad():
        logits = bundle.load_teacher()(torch.from_numpy(bundle.x("test"))).numpy()
    assert np.allclose(logits, bundle.teacher_logits("test"), atol=1e-4)


def test_teacher_is_wrong_on_the_distillation_data_because_of_the_vendor_labels():
    bundle = load_bundle()
    y, pred = bundle.y("train"), bundle.teacher_logits("train").argmax(1)
    wrong = pred != y
    assert wrong.any()
    # its mistakes on the transfer data follow the vendor's relabelling (4->9, 7->1)
    labels = bundle.analysis_labels()
    true_u = labels["y_unlabelled_true"]
    pred_u = bundle.teacher_logits("unlabelled").argmax(1)
    assert ((true_u == 4) & (pred_u == 9)).sum() > 0.3 * (true_u == 4).sum()
    assert ((true_u == 7) & (pred_u == 1)).sum() > 0.3 * (true_u == 7).sum()


def test_student_is_much_smaller_than_teacher():
    from kdcore.models import build_model, count_parameters

    bundle = load_bundle()
    student = count_parameters(build_model(bundle.student_spec))
    teacher = count_parameters(build_model(bundle.teacher_spec))
    assert student * 50 < teacher
