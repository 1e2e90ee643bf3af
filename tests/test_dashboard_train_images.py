"""The Train page's image-folder mode: it plans image runs from the form and queues them with
the right config; bad input is one error line. No job process is started here (the queue's
launcher is stubbed): the jobs themselves are tested in test_jobs.py and test_image_train.py."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from kdcore.learning.image_train import PRESETS
from kdcore.learning.models import build_model
from kdcore.learning.train import TrainConfig
from kdcore.store import jobs
from kdcore.store.runs import RunStore

PAGE = Path(__file__).resolve().parents[1] / "dashboard" / "app_pages" / "train.py"
CLASSES = ["a", "b", "c"]
ARCH = "resnet8"  # the smallest CIFAR network of the zoo: quick to load and check


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of 32x32 noise images (train/ and test/, three classes) and the state dict of
    a zoo teacher for it."""
    root = tmp_path_factory.mktemp("train-images")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CLASSES:
            (root / "images" / split / name).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "images" / split / name / f"{i}.png")
    torch.manual_seed(0)
    weights = root / "teacher.pt"
    torch.save(build_model({"type": ARCH, "n_classes": len(CLASSES)}).state_dict(), weights)
    return root / "images", weights


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty workspace whose queue starts no process."""
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path))
    monkeypatch.setattr(jobs, "start_queued", lambda *args, **kwargs: [])
    return tmp_path


def image_mode(folder: Path | str) -> AppTest:
    at = AppTest.from_file(str(PAGE), default_timeout=60).run()
    at.radio(key="train_mode").set_value("images").run()
    return at.text_input(key="train_img_path").input(str(folder)).run()


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def test_image_mode_queues_runs_with_the_form_config(images, home):
    folder, weights = images
    at = image_mode(folder)
    assert not errors(at)
    cifar = PRESETS["cifar"]
    # the cifar recipe is prefilled
    assert at.number_input(key="train_img_epochs").value == cifar["epochs"]
    assert at.number_input(key="train_img_batch").value == cifar["batch_size"]
    assert at.selectbox(key="train_img_normalize").value == cifar["normalize"]
    at.selectbox(key="train_img_student").set_value(ARCH)
    at.selectbox(key="train_img_teacher_arch").set_value(ARCH)
    at.text_input(key="train_img_weights").input(str(weights))
    at.number_input(key="train_img_epochs").set_value(2)
    at.number_input(key="train_img_batch").set_value(4)
    at.run()
    assert not errors(at)
    assert any("2 runs" in m.value and "2 to train" in m.value for m in at.markdown)

    at.button(key="train_start").click().run()
    assert not errors(at)
    queued = RunStore(home).list(status="queued")
    assert sorted(r.strategy for r in queued) == ["kd", "kd+be+br+dl"]
    for run in queued:
        assert "loader_workers" not in run.config  # how fast, not what is trained
        config = TrainConfig(**run.config)  # as the job reads it
        assert config.bundle == str(folder.resolve())
        assert (config.student_arch, config.teacher_arch) == (ARCH, ARCH)
        assert config.teacher_weights == str(weights.resolve())
        assert (config.epochs, config.batch_size, config.seed) == (2, 4, 0)
        assert config.preset == "cifar"
        for key in ("optimizer", "lr", "momentum", "weight_decay", "lr_schedule",
                    "lr_milestones", "augment", "normalize"):
            assert getattr(config, key) == cifar[key], key
    # the same form again: both runs are in flight, nothing new to queue
    assert at.button(key="train_start").disabled


def test_without_a_recipe_the_form_takes_kdcores_defaults(images, home):
    at = image_mode(images[0])
    at.selectbox(key="train_img_preset").set_value("none").run()
    assert at.number_input(key="train_img_epochs").value == 80
    assert at.selectbox(key="train_img_normalize").value == "none"


def test_a_bad_folder_is_one_error_line(tmp_path, home):
    at = image_mode(tmp_path / "nowhere")
    assert len(errors(at)) == 1
    assert "no such folder" in errors(at)[0]
    assert not [b for b in at.button if b.key == "train_start"]


def test_without_a_teacher_only_ce_trains(images, home):
    folder, _ = images
    at = image_mode(folder)
    at.selectbox(key="train_img_student").set_value(ARCH)
    at.radio(key="train_img_teacher").set_value("none").run()
    assert at.multiselect(key="train_img_strategies").value == ["ce"]
    assert not errors(at)
    at.multiselect(key="train_img_strategies").set_value(["kd"]).run()
    assert len(errors(at)) == 1
    assert "needs a teacher" in errors(at)[0]


def test_a_wrong_teacher_file_is_one_error_line(images, home, tmp_path):
    folder, _ = images
    at = image_mode(folder)
    at.selectbox(key="train_img_teacher_arch").set_value(ARCH)
    at.text_input(key="train_img_weights").input(str(tmp_path / "missing.pt")).run()
    assert len(errors(at)) == 1
    assert "missing.pt" in errors(at)[0]


def test_a_running_job_shows_the_time_it_still_needs(images, home):
    store = RunStore(home)
    config = TrainConfig.for_images(images[0], student_arch=ARCH, strategy="ce", epochs=4)
    run_id = store.create(config.to_dict())
    store.start(run_id)  # this process: alive, so the run is not reaped as interrupted
    time.sleep(1.0)
    store.progress(run_id, step=1, total_steps=4)
    at = AppTest.from_file(str(PAGE), default_timeout=60).run()
    bars = [e.proto.text for e in at.get("progress")]
    elapsed = store.get(run_id).duration_s
    assert len(bars) == 1
    left = re.search(r"25% · .* · about (\d+) s left", bars[0])
    assert left, bars
    assert int(left[1]) == pytest.approx(3 * elapsed, abs=1.5)  # 1 of 4 steps done so far
