"""Training vision students on image folders (kdcore.learning.image_train): the teacher run on
every view, checkpoints and resume, the cifar preset, the CLI, and the bundle path unchanged."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from kdcore.data.bundles import load_bundle
from kdcore.errors import DataError
from kdcore.learning.image_train import (
    CHECKPOINTS,
    DRAWS,
    PAD,
    PRESETS,
    Teacher,
    augment,
    load_run_models,
    read_checkpoint,
    view_step,
)
from kdcore.learning.losses import kd_per_sample, parse_strategy, swap_rectify
from kdcore.learning.models import build_model
from kdcore.learning.train import TrainConfig, make_schedule, train_student
from kdcore.store.jobs import CHECKPOINT_DIR, execute_run, resume_run
from kdcore.store.runs import RunStore, config_key
from kdcore.value.predictions import load_test_predictions

N_CLASSES, SIDE = 10, 8  # 10 classes of tiny images: resnet8x4 halves them twice
STUDENT = "resnet8x4"


def make_images(root, *, train=8, test=2):
    """root/{train,test}/c<k>/<i>.png: noise, each class with one channel darker."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(N_CLASSES):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
                pixels[:, :, c % 3] //= 2 + c
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def save_teachers(folder, n_classes=N_CLASSES, name="teacher"):
    """A resnet8 teacher as weights (.pt), TorchScript (.ts) and ONNX (.onnx)."""
    torch.manual_seed(1)
    model = build_model({"type": "resnet8", "n_classes": n_classes}).eval()
    x = torch.randn(2, 3, SIDE, SIDE)
    files = {kind: folder / f"{name}.{kind}" for kind in ("pt", "ts", "onnx")}
    torch.save(model.state_dict(), files["pt"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, x), str(files["ts"]))
        torch.onnx.export(model, (x,), str(files["onnx"]), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    return files


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return make_images(root / "imgs"), save_teachers(root)


def _config(images, **options):
    values = {"student_arch": STUDENT, "strategy": "kd+be+br+dl", "epochs": 1,
              "batch_size": 40, **options}
    return TrainConfig.for_images(images, **values)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the loop ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ts", "onnx"])
def test_one_epoch_from_a_program_teacher_ends_with_finite_metrics(data, kind):
    images, teachers = data
    model, result, metrics = train_student(_config(images, teacher_model=str(teachers[kind])))
    assert len(result.history) == 1 and np.isfinite(result.history[0]["loss"])
    for key in ("test_accuracy", "best_test_accuracy", "bias_inheritance",
                "teacher_test_accuracy"):
        assert np.isfinite(metrics[key]), key
    assert set(metrics["per_class_accuracy"]) == {f"c{c}" for c in range(N_CLASSES)}
    assert metrics["student_params"] == sum(p.numel() for p in model.parameters())
    resnet8 = build_model({"type": "resnet8", "n_classes": N_CLASSES})
    assert metrics["teacher_params"] == (None if kind == "onnx" else
                                         sum(p.numel() for p in resnet8.parameters()))
    assert result.test_logits.shape == result.teacher_test_logits.shape == (20, N_CLASSES)
    assert metrics["world_size"] == 1 and metrics["train_seconds"] > 0


def test_transfer_images_are_distilled_and_set_the_epoch_when_they_outnumber_the_labelled(
        data, tmp_path):
    images, teachers = data
    folder = make_images(tmp_path / "imgs", train=2, test=1)
    (folder / "unlabelled").mkdir()
    for i in range(30):
        (folder / "unlabelled" / f"u{i}.png").write_bytes((images / "train/c1/0.png").read_bytes())
    seen = []
    config = TrainConfig.for_images(folder, student_arch="resnet8", strategy="kd",
                                    teacher_model=str(teachers["ts"]), epochs=1, batch_size=8,
                                    unlabelled_batch_size=4)
    result = train_student(config, on_progress=lambda step, total, m: seen.append(total))[1]
    assert seen[-1] == 30 // 4 + 1  # the 30 transfer images, 4 a step, not the 20 labelled
    assert result.history[0]["transfer"] > 0


def test_a_view_the_teacher_gets_wrong_is_rectified_and_its_right_twin_is_not():
    class LeftOrRight(nn.Module):
        """Class 0 when the left column is the bright one, class 1 when the right one is."""

        def forward(self, x):
            side = x[:, 0, :, 0].mean(1) - x[:, 0, :, -1].mean(1)
            return 10 * torch.stack([side, -side], 1)

    image = np.zeros((1, 4, 4), np.float32)
    image[:, :, 0] = 1.0  # bright on the left: the teacher says 0, the label is 1
    flip = (2 * PAD + 1) ** 2 + PAD * (2 * PAD + 1) + PAD  # centred crop, flipped
    assert flip < DRAWS
    twin = augment(image, flip)
    assert twin[0, 0, -1] == 1.0 and twin[0, 0, 0] == 0.0
    inputs, labels = torch.from_numpy(np.stack([image, twin])), torch.tensor([1, 1])
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    nn.init.zeros_(student[1].weight)
    nn.init.zeros_(student[1].bias)
    teacher = Teacher(LeftOrRight(), "left or right")
    config = TrainConfig(strategy="kd+be+br", epochs=1)
    parts = view_step(student, teacher, inputs, labels, config,
                      strategy=parse_strategy("kd+be+br"), method=None, epoch=0,
                      optimizer=torch.optim.SGD(student.parameters(), lr=0.0), schedule=None)
    assert parts.wrong.tolist() == [True, False]  # the split is this batch's, view by view
    views = LeftOrRight()(inputs)
    assert views.argmax(1).tolist() == [0, 1]
    expected = kd_per_sample(torch.zeros(2, 2), swap_rectify(views, labels), temperature=4.0)
    torch.testing.assert_close(parts.per_sample, expected)
    # rectified, the wrong view is distilled exactly as its right twin is, as it is
    torch.testing.assert_close(parts.per_sample[0], parts.per_sample[1])


def test_augment_crops_from_the_zero_padded_image_and_flips():
    image = np.arange(2 * 6 * 10, dtype=np.float32).reshape(2, 6, 10) + 1
    side = 2 * PAD + 1
    assert np.array_equal(augment(image, PAD * side + PAD), image)  # centred, not flipped
    shifted = augment(image, 0)  # the top-left corner of the padded image
    assert np.array_equal(shifted[:, PAD:, PAD:], image[:, :6 - PAD, :10 - PAD])
    assert not shifted[:, :PAD].any()
    assert np.array_equal(augment(image, side**2 + PAD * side + PAD), image[:, :, ::-1])


def test_loader_workers_change_the_speed_not_the_run(data, one_thread):
    images, teachers = data
    runs = [train_student(_config(images, teacher_model=str(teachers["ts"]), preset="cifar",
                                  epochs=1, batch_size=40, loader_workers=w))[1].test_logits
            for w in (0, 2)]
    assert np.array_equal(*runs)


# --- the recipe and the config ------------------------------------------------------------


def test_the_cifar_preset_is_mdistillers_recipe_and_any_option_overrides_it(data):
    images, teachers = data
    config = _config(images, teacher_model=str(teachers["ts"]), preset="cifar", epochs=None,
                     batch_size=None)
    assert (config.batch_size, config.optimizer, config.momentum, config.weight_decay) == (
        64, "sgd", 0.9, 5e-4)
    assert (config.lr, config.lr_schedule, config.lr_milestones, config.lr_decay,
            config.epochs) == (0.05, "multistep", [150, 180, 210], 0.1, 240)
    assert config.augment and config.normalize == "cifar100"
    assert PRESETS["cifar"]["epochs"] == 240
    mine = _config(images, teacher_model=str(teachers["ts"]), preset="cifar", epochs=3, lr=0.1)
    assert (mine.epochs, mine.lr, mine.batch_size) == (3, 0.1, 40)


def test_multistep_divides_the_rate_after_each_milestone_as_mdistiller():
    config = TrainConfig(epochs=240, lr=0.05, optimizer="sgd", lr_schedule="multistep",
                         lr_milestones=[150, 180, 210], lr_decay=0.1)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    per_epoch = 3
    schedule = make_schedule(optimizer, config, per_epoch * config.epochs)
    rates = []
    for _ in range(config.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        for _ in range(per_epoch):
            optimizer.step()
            schedule.step()
    # mdistiller: lr * 0.1 ** sum(epoch > stages), epochs counted from 1
    expected = [0.05 * 0.1 ** sum(e + 1 > m for m in (150, 180, 210)) for e in range(240)]
    np.testing.assert_allclose(rates, expected, rtol=1e-12)


def test_an_image_config_stores_only_what_differs_and_never_the_loader_workers(data):
    images, teachers = data
    config = _config(images, teacher_model=str(teachers["onnx"]), loader_workers=3)
    stored = config.to_dict()
    assert "loader_workers" not in stored and "momentum" not in stored
    assert stored["student_arch"] == STUDENT and os.path.isabs(stored["teacher_model"])
    same = _config(images, teacher_model=str(teachers["onnx"]), loader_workers=0)
    assert config_key(same.to_dict()) == config_key(stored)
    assert TrainConfig(**stored).to_dict() == stored


def test_the_sample_bundle_trains_exactly_as_before(one_thread):
    bundle = load_bundle()
    config = TrainConfig.for_bundle(bundle, strategy="kd+be+br+dl", seed=0, epochs=3)
    stored = {**config.to_dict(), "bundle": "sample"}
    assert sorted(stored) == ["batch_size", "bundle", "device", "epochs", "lam", "lr",
                              "lr_schedule", "normalisation", "optimizer", "seed", "strategy",
                              "temperature", "unlabelled_batch_size", "weight_decay"]
    # measured before image training was added: 265 of the 540 test images
    assert train_student(config, bundle)[2]["test_accuracy"] == 265 / 540


# --- bad input ----------------------------------------------------------------------------


def _refused(images, **options) -> str:
    with pytest.raises(DataError) as info:
        _config(images, **options)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_input_is_one_line_naming_the_fix(data, tmp_path):
    images, teachers = data
    assert "needs a teacher" in _refused(images, strategy="kd")
    assert "unknown architecture 'resnet9' for --student" in _refused(
        images, student_arch="resnet9", strategy="ce")
    assert "unknown architecture 'vgg' for --teacher" in _refused(
        images, teacher_arch="vgg", teacher_weights=str(teachers["pt"]))
    assert "go together" in _refused(images, teacher_arch="resnet8")
    assert "not both" in _refused(images, teacher_model=str(teachers["ts"]),
                                  teacher_arch="resnet8", teacher_weights=str(teachers["pt"]))
    assert "--preset 'imagenet' is not known" in _refused(images, strategy="ce",
                                                          preset="imagenet")
    seven = save_teachers(tmp_path, n_classes=7, name="seven")
    for kind in ("ts", "onnx"):
        message = _refused(images, teacher_model=str(seven[kind]))
        assert "7" in message and "10 classes" in message and seven[kind].name in message
    message = _refused(images, teacher_arch="resnet8", teacher_weights=str(seven["pt"]))
    assert "7 classes" in message and "10" in message


def test_a_student_alone_trains_on_labels_and_saves_no_teacher_logits(data, workspace):
    images, _ = data
    store = RunStore(workspace)
    run_id = store.create(_config(images, strategy="ce").to_dict())
    threads = torch.get_num_threads()
    try:
        metrics = execute_run(run_id, workspace=workspace)
    finally:
        torch.set_num_threads(threads)
    assert metrics["teacher_test_accuracy"] is None and metrics["bias_inheritance"] is None
    with np.load(store.artifact_dir(run_id) / "test_predictions.npz") as saved:
        assert sorted(saved.files) == ["labels", "logits"]


def test_load_run_models_gives_the_teacher_the_skeleton_and_prepared_test_images(data):
    images, teachers = data
    config = _config(images, teacher_model=str(teachers["onnx"]), preset="cifar")
    teacher, student, inputs = load_run_models(config.to_dict())
    assert inputs.shape == (20, 3, SIDE, SIDE) and inputs.dtype == np.float32
    assert inputs.min() < 0  # normalised with CIFAR-100's mean and std
    x = torch.from_numpy(inputs)
    assert teacher(x).shape == student(x).shape == (20, N_CLASSES)
    with pytest.raises(DataError, match="without a teacher"):
        load_run_models(_config(images, strategy="ce"))


# --- checkpoints and resume ---------------------------------------------------------------


def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_same_end(data, workspace, tmp_path):
    images, teachers = data
    args = [str(images), "--student", "resnet8", "--teacher", "resnet8", "--teacher-weights",
            str(teachers["pt"]), "--strategy", "kd+be+br+dl", "--epochs", "4",
            "--batch-size", "40", "--quiet"]
    env = {**os.environ, "KDCORE_HOME": str(workspace)}
    proc = subprocess.Popen([sys.executable, "-m", "kdcore", "train", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = workspace / "runs"
    deadline = time.monotonic() + 300
    while not list(runs.glob(f"*/{CHECKPOINT_DIR}/{CHECKPOINTS[0]}")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    (last,) = runs.glob(f"*/{CHECKPOINT_DIR}/{CHECKPOINTS[0]}")
    run_id = last.parent.parent.name
    store = RunStore(workspace)
    run = store.get(run_id)
    assert run.status == "failed" and run.error.startswith("interrupted")
    saved = read_checkpoint(last)  # weights only: no code unpickled
    per_epoch = 80 // 40
    assert saved["step"] == (saved["epoch"] + 1) * per_epoch
    assert saved["epoch"] < 3, "the run finished before it could be killed"

    out = subprocess.run([sys.executable, "-m", "kdcore", "train", "--resume", run_id[:15],
                          "--json", "--quiet"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    run = store.get(run_id)
    assert doc["run_id"] == run_id and run.status == "done" and run.error is None
    assert run.step == run.total_steps == 4 * per_epoch
    assert list(store.epochs(run_id)["epoch"]) == list(range(4))  # earlier epochs kept
    assert read_checkpoint(last)["epoch"] == 3
    assert sorted(p.name for p in last.parent.iterdir()) == sorted(CHECKPOINTS)

    # the same run trained without a stop ends on the same predictions
    other = RunStore(tmp_path / "other")
    reference = other.create(TrainConfig(**run.config).to_dict())
    threads = torch.get_num_threads()
    try:
        execute_run(reference, workspace=other.workspace)
    finally:
        torch.set_num_threads(threads)
    resumed = load_test_predictions(store, run)
    again = load_test_predictions(other, other.get(reference))
    assert np.array_equal(resumed.logits, again.logits)
    assert np.array_equal(resumed.teacher_logits, again.teacher_logits)

    with pytest.raises(DataError, match="is done, so there is nothing to resume"):
        resume_run(run_id, workspace=workspace)


def test_only_a_stopped_image_run_with_a_checkpoint_resumes(data, workspace):
    images, _ = data
    store = RunStore(workspace)
    bundle_run = store.create({"bundle": "b", "strategy": "kd", "seed": 0}, status="failed")
    with pytest.raises(DataError, match="only image runs keep checkpoints"):
        resume_run(bundle_run, workspace=workspace)
    early = store.create(_config(images, strategy="ce").to_dict(), status="cancelled")
    with pytest.raises(DataError, match="no checkpoint"):
        resume_run(early, workspace=workspace)
    running = store.create(_config(images, strategy="ce").to_dict(), status="running")
    (store.artifact_dir(running) / CHECKPOINT_DIR).mkdir()
    (store.artifact_dir(running) / CHECKPOINT_DIR / CHECKPOINTS[0]).write_bytes(b"")
    with pytest.raises(DataError, match="still running"):
        resume_run(running, workspace=workspace)
