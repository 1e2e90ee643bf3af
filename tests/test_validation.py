"""Bad input is refused before anything is stored (issue 13, items 3, 4 and 6).

Each case is a copy of the bundled sample with one thing changed, or a bad training option.
``kdcore train`` must refuse it with exit 2 and one line on stderr that names the file or field
and the fix, and leave the run store empty: no ``failed`` run, no half-written one.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcore.cli import main
from kdcore.data.bundles import sample_bundle_path


def _cli(*args: object, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcore", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _runs(workspace: Path, capsys) -> list:
    capsys.readouterr()
    assert main(["runs", "list", "--json", "--workspace", str(workspace)]) == 0
    return json.loads(capsys.readouterr().out)["runs"]


# ----------------------------------------------------------------------------- bundle edits


def _read_manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write_manifest(bundle: Path, manifest: object) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def manifest_edit(change):
    """A case that edits the parsed manifest in place with ``change(manifest, outside)``."""
    def apply(bundle: Path, outside: Path) -> None:
        manifest = _read_manifest(bundle)
        change(manifest, outside)
        _write_manifest(bundle, manifest)
    return apply


def arrays_edit(change):
    """A case that edits data.npz's arrays (a dict) in place with ``change(arrays)``."""
    def apply(bundle: Path, outside: Path) -> None:
        with np.load(bundle / "data.npz") as data:
            arrays = {key: data[key] for key in data.files}
        change(arrays)
        np.savez(bundle / "data.npz", **arrays)
    return apply


def _outside_copy(bundle: Path, outside: Path, name: str) -> Path:
    shutil.copy(bundle / name, outside / name)
    return outside / name


def _symlinked_data(bundle: Path, outside: Path) -> None:
    target = _outside_copy(bundle, outside, "data.npz")
    (bundle / "data.npz").unlink()
    (bundle / "data.npz").symlink_to(target)


def _symlinked_folder(bundle: Path, outside: Path) -> None:
    _outside_copy(bundle, outside, "data.npz")
    (bundle / "arrays").symlink_to(outside, target_is_directory=True)
    manifest = _read_manifest(bundle)
    manifest["data"] = "arrays/data.npz"
    _write_manifest(bundle, manifest)


def _set(arrays: dict, key: str, value: np.ndarray) -> None:
    arrays[key] = value


def _split(arrays: dict, split: str, rows: slice) -> None:
    for key in (f"x_{split}", f"y_{split}", f"teacher_logits_{split}"):
        arrays[key] = arrays[key][rows]


def _nan(arrays: dict) -> None:
    arrays["x_train"] = arrays["x_train"].copy()
    arrays["x_train"][3, 5] = np.nan


def _object_labels(arrays: dict) -> None:
    arrays["y_train"] = arrays["y_train"].astype(object)


def _three_d(arrays: dict) -> None:
    for split in ("train", "unlabelled", "test"):
        x = arrays[f"x_{split}"]
        arrays[f"x_{split}"] = np.stack([x, x], axis=2)


def _latin1(bundle: Path, outside: Path) -> None:
    manifest = _read_manifest(bundle)
    manifest["name"] = "digits café"
    (bundle / "manifest.json").write_bytes(json.dumps(manifest, ensure_ascii=False)
                                           .encode("latin-1"))


class Payload:
    """Pickles as a call to os.system: what a malicious teacher.pt carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_weights(file: Path, marker: Path) -> None:
    """A teacher.pt whose unpickling would run a shell command (never loaded unsafely here)."""
    state = torch.load(sample_bundle_path() / "teacher.pt", weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, file)


def _malicious(bundle: Path, outside: Path) -> None:
    malicious_weights(bundle / "teacher.pt", outside / "pwned")


def _write(name: str, content: bytes):
    def apply(bundle: Path, outside: Path) -> None:
        (bundle / name).write_bytes(content)
    return apply


# (id, edit of the bundle copy or None, extra `kdcore train` options, words the line must hold)
CASES = [
    # item 3: malformed bundles that left a failed run
    ("data-outside", manifest_edit(lambda m, o: m.update(data="../outside/data.npz")), (),
     ["manifest.json", "outside the bundle folder"]),
    ("data-absolute", manifest_edit(lambda m, o: m.update(data=str(o / "data.npz"))), (),
     ["manifest.json", "outside the bundle folder"]),
    ("weights-outside",
     manifest_edit(lambda m, o: m["teacher"].update(weights="../outside/teacher.pt")), (),
     ["manifest.json", "outside the bundle folder"]),
    ("analysis-labels-absolute",
     manifest_edit(lambda m, o: m.update(analysis_only_labels="/etc/hostname")), (),
     ["manifest.json", "outside the bundle folder"]),
    ("data-symlink-out", _symlinked_data, (), ["manifest.json", "outside the bundle folder"]),
    ("folder-symlink-out", _symlinked_folder, (), ["manifest.json", "outside the bundle folder"]),
    ("object-arrays", arrays_edit(_object_labels), (), ["data.npz", "rebuild"]),
    ("corrupt-npz", _write("data.npz", b"PK\x03\x04 not a zip file"), (), ["data.npz", "rebuild"]),
    ("x-test-missing", arrays_edit(lambda a: a.pop("x_test")), (), ["data.npz", "'x_test'"]),
    ("logits-k-1", arrays_edit(lambda a: _set(a, "teacher_logits_train",
                                              a["teacher_logits_train"][:, :-1])), (),
     ["data.npz", "teacher_logits_train", "(62, 10)"]),
    ("x-fewer-rows", arrays_edit(lambda a: _set(a, "x_train", a["x_train"][:-1])), (),
     ["data.npz", "y_train"]),
    ("manifest-not-json", _write("manifest.json", b"{not json"), (), ["manifest.json", "JSON"]),
    ("manifest-a-list", _write("manifest.json", b"[1, 2]"), (), ["manifest.json", "object"]),
    ("manifest-latin-1", _latin1, (), ["manifest.json", "UTF-8"]),
    ("student-type-unknown",
     manifest_edit(lambda m, o: m["student"]["architecture"].update(type="transformer")), (),
     ["manifest.json", "student", "transformer", "mlp"]),
    # item 3: malformed bundles that gave "internal failure", exit 1
    ("x-dim-not-input-dim",
     manifest_edit(lambda m, o: m["student"]["architecture"].update(input_dim=50)), (),
     ["manifest.json", "student", "input"]),
    ("x-3d", arrays_edit(_three_d), (), ["student", "input"]),
    ("string-labels", arrays_edit(lambda a: _set(a, "y_train", a["y_train"].astype(str))), (),
     ["data.npz", "y_train", "integers"]),
    ("nan-in-x", arrays_edit(_nan), (), ["data.npz", "x_train", "row 3"]),
    ("empty-train", arrays_edit(lambda a: _split(a, "train", slice(0, 0))), (),
     ["data.npz", "x_train", "no rows"]),
    ("class-names-5", manifest_edit(lambda m, o: m.update(class_names=5)), (),
     ["manifest.json", "class_names"]),
    ("teacher-a-string", manifest_edit(lambda m, o: m.update(teacher="str")), (),
     ["manifest.json", "teacher"]),
    ("negative-hidden",
     manifest_edit(lambda m, o: m["student"]["architecture"].update(hidden=[-5])), (),
     ["manifest.json", "student", "hidden"]),
    ("training-defaults-a-list", manifest_edit(lambda m, o: m.update(training_defaults=[1])), (),
     ["manifest.json", "training_defaults"]),
    ("training-defaults-lr-text",
     manifest_edit(lambda m, o: m["training_defaults"].update(lr="fast")), (),
     ["manifest.json", "training_defaults", "lr"]),
    ("training-defaults-batch-size-0",
     manifest_edit(lambda m, o: m["training_defaults"].update(batch_size=0)), (),
     ["manifest.json", "training_defaults", "batch_size"]),
    ("float-labels", arrays_edit(lambda a: _set(a, "y_train", a["y_train"] + 0.5)), (),
     ["data.npz", "y_train", "integers"]),
    ("huge-teacher",
     manifest_edit(lambda m, o: m["teacher"]["architecture"].update(hidden=[10**12, 512])),
     (), ["teacher.pt", "(1000000000000, 64)", "architecture"]),
    # item 4: training options
    ("epochs-0", None, ("--epochs", "0"), ["epochs", "--epochs"]),
    ("lam-5", None, ("--lam", "5"), ["lam", "--lam"]),
    ("temperature-negative", None, ("--temperature", "-2"), ["temperature", "--temperature"]),
    ("batch-size-negative", None, ("--batch-size", "-5"), ["batch_size", "--batch-size"]),
    ("lr-inf", None, ("--lr", "inf"), ["lr", "--lr"]),
    ("lr-nan", None, ("--lr", "nan"), ["lr", "--lr"]),
    ("threads-0", None, ("--threads", "0"), ["--threads"]),
    # item 6: a teacher.pt that would run code if it were unpickled
    ("malicious-teacher", _malicious, (), ["teacher.pt", "state dict"]),
]


@pytest.fixture
def bundle_copy(tmp_path):
    """(bundle, outside): a copy of the sample, and a folder next to it."""
    return _copy(tmp_path)


def _copy(folder: Path) -> tuple[Path, Path]:
    bundle, outside = folder / "bundle", folder / "outside"
    shutil.copytree(sample_bundle_path(), bundle)
    outside.mkdir()
    return bundle, outside


# Runs `kdcore train` on every case in one process, so the interpreter and torch start once:
# main() is what `python -m kdcore` runs, and its stderr is captured per case. Every warning is
# shown, so a case prints at least as many lines as it would in a process of its own.
DRIVER = """
import contextlib, io, json, sys, warnings
from kdcore.cli import main
warnings.simplefilter("always")
results = {}
for name, argv in json.loads(sys.stdin.read()).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict:
    """case id -> (exit status, stderr, workspace, outside folder) of `kdcore train` on it."""
    argv, folders = {}, {}
    for name, edit, options, _ in CASES:
        bundle, outside = _copy(tmp_path_factory.mktemp(name))
        if edit is not None:
            edit(bundle, outside)
        workspace = outside.parent / "ws"
        argv[name] = ["train", str(bundle), "--strategy", "kd", "--epochs", "1", *options,
                      "--quiet", "--workspace", str(workspace)]
        folders[name] = workspace, outside
    out = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(argv),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    return {name: (*results[name], *folders[name]) for name in argv}


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line_and_nothing_is_stored(refusals, capsys, case):
    code, stderr, workspace, outside = refusals[case]
    words = next(c[3] for c in CASES if c[0] == case)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "; " in lines[0], f"no fix in: {lines[0]}"
    for word in words:
        assert word in lines[0]
    assert _runs(workspace, capsys) == []
    assert not (outside / "pwned").exists()


def test_compare_refuses_a_bad_option_before_any_run_is_stored(tmp_path, capsys):
    workspace = tmp_path / "ws"
    out = _cli("compare", "--strategies", "ce,kd", "--seeds", "1", "--epochs", "2", "--lam", "5",
               "--quiet", "--workspace", workspace)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "--lam" in out.stderr
    assert _runs(workspace, capsys) == []


def test_the_dashboard_queue_refuses_a_bad_bundle_before_any_run_is_stored(bundle_copy,
                                                                           tmp_path):
    """The Train page plans with compare.plan and queues with jobs.queue_runs."""
    from kdcore.data.bundles import load_bundle
    from kdcore.errors import DataError
    from kdcore.store.jobs import queue_runs
    from kdcore.store.runs import RunStore
    from kdcore.value.compare import plan

    bundle, outside = bundle_copy
    arrays_edit(lambda a: _set(a, "y_train", a["y_train"] + 0.5))(bundle, outside)
    with pytest.raises(DataError, match="y_train"):
        queue_runs(plan(load_bundle(bundle), ["kd"], range(1), epochs=1),
                   workspace=tmp_path / "ws", max_jobs=1)
    assert RunStore(tmp_path / "ws").list() == []


def test_a_malicious_teacher_is_refused_by_roi_and_skipped_by_report(bundle_copy, tmp_path):
    """Trained on a good copy, then teacher.pt is swapped for one that would run code."""
    bundle, outside = bundle_copy
    workspace = tmp_path / "ws"
    out = _cli("train", bundle, "--strategy", "kd", "--epochs", "1", "--quiet", "--workspace",
               workspace)
    assert out.returncode == 0, out.stderr
    malicious_weights(bundle / "teacher.pt", outside / "pwned")

    out = _cli("roi", bundle, "--repeats", "3", "--workspace", workspace)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and "teacher.pt" in lines[0] and "weights_only" not in lines[0]

    report = tmp_path / "report.html"
    out = _cli("report", bundle, "--out", report, "--threads", "1", "--workspace", workspace)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 0, out.stderr
    assert len(lines) == 1 and lines[0].startswith("note: ") and "teacher.pt" in lines[0]
    assert "teacher.pt" in report.read_text()  # the report says why it has no ROI section
    assert not (outside / "pwned").exists()


def test_teacher_parameters_are_counted_from_the_spec_without_building_it():
    from kdcore.learning.models import spec_parameters

    huge = {"type": "mlp", "input_dim": 64, "hidden": [10**12], "n_classes": 10}
    assert spec_parameters(huge) == 64 * 10**12 + 10**12 + 10**12 * 10 + 10
