"""The bundled sample: small, rebuildable, and the regime the issue asks for."""

import importlib.util
import json
from pathlib import Path

import numpy as np

from kdcore.data.bundles import load_bundle, sample_bundle_path

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


def test_build_script_reproduces_the_shipped_sample(tmp_path):
    """The data arrays bit for bit; the teacher to within the rounding of the CPU's kernels.

    torch picks its CPU kernels by instruction set (AVX-512 or AVX2, see
    ``torch.backends.cpu.get_cpu_capability()``), and their rounding differs, so a teacher
    trained for 300 epochs on another machine lands on slightly different weights.
    """
    manifest = _build_module().build(tmp_path / "rebuilt", seed=0)
    shipped = json.loads((sample_bundle_path() / "manifest.json").read_text())
    assert abs(manifest["teacher"]["test_accuracy"] - shipped["teacher"]["test_accuracy"]) < 0.01
    with np.load(tmp_path / "rebuilt" / "data.npz") as new, \
            np.load(sample_bundle_path() / "data.npz") as old:
        assert sorted(new.files) == sorted(old.files)
        for key in old.files:
            if key.startswith("teacher_logits"):
                agree = (new[key].argmax(1) == old[key].argmax(1)).mean()
                assert agree >= 0.99, (key, agree)
            else:
                assert np.array_equal(new[key], old[key]), key


def test_teacher_weights_reproduce_the_shipped_logits():
    bundle = load_bundle()
    import torch

    from kdcore.learning.teachers import load_teacher

    with torch.no_grad():
        logits = load_teacher(bundle)(torch.from_numpy(bundle.x("test"))).numpy()
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
    from kdcore.learning.models import build_model, count_parameters

    bundle = load_bundle()
    student = count_parameters(build_model(bundle.student_spec))
    teacher = count_parameters(build_model(bundle.teacher_spec))
    assert student * 50 < teacher
