"""Images in the dashboard: the Data page's image folder with its teacher (predicted in a
background task), and thumbnails in the Teacher-bias drill-down, a missing file shown as a
placeholder, never an error."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from kdcore.data import thumbnails
from kdcore.data.sources import load_predictions
from kdcore.data.tables import IMAGE_ROOT_KEY
from kdcore.errors import DataError
from kdcore.learning.model_files import image_architectures
from kdcore.store import tasks
from kdcore_app import state

PAGES = Path(__file__).resolve().parents[1] / "dashboard" / "app_pages"
CLASSES = ["red", "green", "blue"]
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
PER_SPLIT = {"train": 4, "test": 5}
TASK_S = 240  # a predict process imports torch: slow on a busy 2-core machine


def page(name: str) -> AppTest:
    return AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=60)


def make_folder(root: Path) -> Path:
    """train/ and test/ of solid 12x12 squares, one colour per class."""
    for split, n in PER_SPLIT.items():
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), COLOURS[name]).save(root / split / name / f"{i}.png")
    return root


def write_table(path: Path, root: Path | None, rng: np.random.Generator) -> pa.Table:
    """A prediction table over ``root``'s images (as ``kdcore predict`` writes one): the
    teacher is right on train and says "red" for every test image."""
    rows = []
    for split in PER_SPLIT:
        for k, name in enumerate(CLASSES):
            for i in range(PER_SPLIT[split]):
                said = k if split == "train" else 0
                logits = rng.normal(0, 0.1, len(CLASSES))
                logits[said] += 3 + i  # confidence grows with i
                rows.append((f"{split}/{name}/{i}.png", split, name, *logits))
    columns = list(zip(*rows, strict=True))
    table = pa.table({"sample_id": columns[0], "split": columns[1], "label": columns[2],
                      **{f"logit_{c}": pa.array(columns[3 + j], pa.float32())
                         for j, c in enumerate(CLASSES)}})
    if root is not None:
        table = table.replace_schema_metadata({IMAGE_ROOT_KEY: str(root)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return table


@pytest.fixture
def predicted(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A workspace holding a predicted image folder's table; (image root, workspace)."""
    home = tmp_path / "ws"
    monkeypatch.setenv("KDCORE_HOME", str(home))
    root = make_folder(tmp_path / "images")
    table = write_table(home / tasks.PREDICTIONS_DIR / "shapes.parquet", root,
                        np.random.default_rng(0))
    return root, home, table.to_pandas()


def open_drill_down(at: AppTest, source: str, names: list[str] = CLASSES) -> AppTest:
    """The Teacher-bias page on ``source`` (its classes ``names``, in order) after a click on
    the heatmap's cell of true "green" read as "red" (the selection event the browser
    sends)."""
    at.run()
    at.selectbox(key="bias_source").set_value(source).run()
    green, red = (names.index(c) for c in ("green", "red"))
    at.session_state["bias_heatmap_test"] = {"selection": {"points": [
        {"customdata": {"0": green, "1": red}}]}}
    at.run()
    assert (at.selectbox(key="bias_true").value, at.selectbox(key="bias_pred").value) == (
        green, red)
    return at


def captions(at: AppTest) -> list[str]:
    return [c for image in at.image for c in image.captions]


def png_colour(data: bytes) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").getpixel((image.width // 2, image.height // 2))


# ---------------------------------------------------------------- drill-down


def test_drill_down_shows_the_images_of_a_predicted_folder(predicted):
    _, _, frame = predicted
    at = open_drill_down(page("teacher_bias"), "shapes (predicted)")
    assert not at.exception and not at.error
    wrong = frame[(frame.split == "test") & (frame.label == "green")]  # all read as red
    logits = wrong[[f"logit_{c}" for c in CLASSES]].to_numpy(np.float64)
    sure = np.sort((np.exp(logits).T / np.exp(logits).sum(1)).max(0))[::-1]
    assert [c for c in captions(at) if c.startswith("true ")] == [
        f"true green · said red · {p:.0%}" for p in sure]
    n = len(wrong)
    assert any(f"showing {n} of {n}" in m.value for m in at.markdown)
    assert len(at.image) == n + min(n, 8)  # the grid, then one beside each sample's chart


def test_a_missing_image_is_a_placeholder_not_an_error(predicted):
    root = predicted[0]
    (root / "test" / "green" / "4.png").unlink()  # the most confident mistake
    (root / "test" / "green" / "3.png").write_bytes(b"not a png")
    at = open_drill_down(page("teacher_bias"), "shapes (predicted)")
    assert not at.exception and not at.error
    grid = [c for c in captions(at) if "true green" in c]
    assert [c.startswith("missing · ") for c in grid] == [True, True, False, False, False]
    assert captions(at).count("missing") == 2  # beside the two charts too


def test_the_grid_shows_at_most_48_of_many(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path / "ws"))
    root = tmp_path / "many"
    (root / "test" / "green").mkdir(parents=True)
    n = 60
    ids = [f"test/green/{i}.png" for i in range(n)]
    for sample_id in ids[:3]:  # the rest are missing: placeholders
        Image.new("RGB", (4, 4), COLOURS["green"]).save(root / sample_id)
    logits = np.tile(np.float32([[2.0, 0.0, 0.0]]), (n, 1))
    table = pa.table({"sample_id": ids, "split": ["test"] * n, "label": ["green"] * n,
                      **{f"logit_{c}": logits[:, j] for j, c in enumerate(CLASSES)}})
    (tmp_path / "ws" / "predictions").mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata({IMAGE_ROOT_KEY: str(root)}),
                   tmp_path / "ws" / "predictions" / "many.parquet")
    at = open_drill_down(page("teacher_bias"), "many (predicted)")
    assert not at.exception and not at.error
    assert len([c for c in captions(at) if "true green" in c]) == 48
    assert any("showing 48 of 60" in m.value for m in at.markdown)


def test_a_table_without_images_shows_no_grid(tmp_path, monkeypatch):
    home = tmp_path / "ws"
    monkeypatch.setenv("KDCORE_HOME", str(home))
    write_table(home / "predictions" / "plain.parquet", None, np.random.default_rng(0))
    at = open_drill_down(page("teacher_bias"), "plain (predicted)")
    assert not at.exception and not at.error
    assert not at.image and any("samples match" in c.value for c in at.caption)


def test_the_bundled_sample_shows_its_digits_as_images(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path / "ws"))
    at = page("teacher_bias").run()
    assert not at.exception and not at.error
    grid = [c for c in captions(at) if c.startswith("true ")]
    assert 0 < len(grid) <= 48 and not any(c == "missing" for c in captions(at))


# ---------------------------------------------------------------- thumbnails


def test_thumbnails_read_files_inside_the_root_only(tmp_path):
    root = make_folder(tmp_path / "images")
    (tmp_path / "secret.png").write_bytes((root / "train/red/0.png").read_bytes())
    assert thumbnails.image_path(root, "train/red/0.png") == root / "train/red/0.png"
    for outside in ("../secret.png", str(tmp_path / "secret.png"), "train/red/9.png"):
        assert thumbnails.image_path(root, outside) is None
    data = state.thumbnail(str(root), "test/blue/1.png")
    assert png_colour(data) == COLOURS["blue"]
    assert Image.open(io.BytesIO(data)).size == (thumbnails.THUMB_PX,) * 2
    assert state.thumbnail(str(root), "../secret.png") is None


def test_thumbnails_fit_the_square_and_keep_the_aspect():
    wide = thumbnails.fit(Image.new("L", (400, 100), 128))
    assert wide.size == (96, 24) and wide.mode == "RGB"
    small = thumbnails.array_thumbnail(np.arange(64.0).reshape(8, 8))
    assert small.size == (96, 96)
    assert small.getpixel((0, 0)) == (0, 0, 0) and small.getpixel((95, 95)) == (255, 255, 255)
    assert thumbnails.array_thumbnail(np.zeros((3, 5, 5))).size == (96, 96)  # channels first
    assert thumbnails.array_thumbnail(np.zeros(7)) is None
    assert thumbnails.read_thumbnail("/no/such/file.png") is None


def write_cifar10(root: Path, n: int = 2) -> Path:
    """A tiny CIFAR-10 python-version folder: every image solid red."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with (folder / "batches.meta").open("wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh, protocol=2)
    rows = np.zeros((n, 3072), np.uint8)
    rows[:, :1024] = 200
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with (folder / name).open("wb") as fh:
            pickle.dump({b"data": rows, b"labels": list(range(n))}, fh, protocol=2)
    return folder


def test_cifar_thumbnails_come_from_the_archive(tmp_path):
    folder = write_cifar10(tmp_path)
    assert png_colour(state.thumbnail(str(folder), "test_batch/1")) == (200, 0, 0)
    assert state.thumbnail(str(folder), "test_batch/99") is None


# ---------------------------------------------------------------- data page


def test_data_page_names_a_bad_folder_in_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path / "ws"))
    at = page("data").run()
    assert not at.exception and not at.error
    at.text_input(key="data_images_path").set_value(str(tmp_path / "nowhere")).run()
    assert not at.exception
    assert len(at.error) == 1 and "nowhere" in at.error[0].value
    (tmp_path / "empty" / "train").mkdir(parents=True)
    at.text_input(key="data_images_path").set_value(str(tmp_path / "empty")).run()
    assert len(at.error) == 1 and not at.exception
    assert "data_images_predict" not in [b.key for b in at.button]


def test_data_page_shows_what_an_image_folder_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCORE_HOME", str(tmp_path / "ws"))
    root = make_folder(tmp_path / "images")
    at = page("data").run()
    at.text_input(key="data_images_path").set_value(str(root)).run()
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Classes"] == str(len(CLASSES))
    assert metrics["train images"] == str(PER_SPLIT["train"] * len(CLASSES))
    assert metrics["test images"] == str(PER_SPLIT["test"] * len(CLASSES))
    shown = captions(at)
    assert len(shown) == 8 and len(set(shown)) == 8
    assert shown[:3] == [f"train/{c}/0.png" for c in sorted(CLASSES)]  # each class first
    assert any("12x12 pixels, colour" in c.value for c in at.caption)
    at.radio(key="data_images_teacher").set_value("file").run()
    at.text_input(key="data_images_model_file").set_value(str(tmp_path / "none.ts"))
    at.button(key="data_images_predict").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "none.ts" in at.error[0].value
    assert not (tmp_path / "ws" / tasks.TASKS_DIR).exists()  # nothing was started


def test_the_page_list_of_architectures_is_the_zoo():
    assert tasks.IMAGE_ARCHITECTURES == tuple(image_architectures())


def test_pages_can_import_tasks_and_thumbnails_without_torch():
    code = ("import sys, kdcore.store.tasks, kdcore.data.thumbnails; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# ---------------------------------------------------------------- tasks


class Tiny(torch.nn.Module):
    """Says the colour of the image: its mean red, green or blue, in the class order (the
    sorted class folders)."""

    def __init__(self) -> None:
        super().__init__()
        channel = [int(np.argmax(COLOURS[c])) for c in sorted(CLASSES)]
        self.register_buffer("channel", torch.tensor(channel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))[:, self.channel] * 10


@pytest.fixture(scope="module")
def predict_setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(image folder, TorchScript teacher, workspace)."""
    base = tmp_path_factory.mktemp("predict")
    model = base / "tiny.ts"
    torch.jit.save(torch.jit.script(Tiny()), str(model))
    return make_folder(base / "images"), model, base / "ws"


def wait(task: tasks.Task) -> tasks.TaskStatus:
    deadline = time.monotonic() + TASK_S
    while (status := tasks.task_status(task)).state == "running":
        assert time.monotonic() < deadline, f"task still running after {TASK_S} s"
        time.sleep(0.25)
    return status


def gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_predict_task_runs_apart_and_its_table_loads(predict_setup):
    images, model, home = predict_setup
    task = tasks.start_predict(images, model_file=model, workspace=home, batch_size=4)
    assert tasks.task_status(task).state == "running"
    assert tasks.start_predict(images, model_file=model, workspace=home, batch_size=4) == task
    status = wait(task)
    assert status.state == "done", status.message
    assert task.output.parent == home / tasks.PREDICTIONS_DIR
    table = load_predictions(task.output)
    assert table.n_samples == sum(PER_SPLIT.values()) * len(CLASSES)
    assert table.image_root == str(images)
    assert (np.asarray(table.class_names)[table.outputs.argmax(1)] ==
            np.asarray(table.class_names)[table.labels]).all()  # the colours, as Tiny says
    pid = (task.folder / "pid").read_text()
    assert gone(int(pid))  # the runner has ended, and was reaped: no zombie left
    again = tasks.start_predict(images, model_file=model, workspace=home, batch_size=4)
    assert again == task and tasks.task_status(again).state == "done"
    assert (task.folder / "pid").read_text() == pid  # reused: no second process


def test_a_failed_task_says_why(predict_setup, tmp_path):
    images, _, home = predict_setup
    bad = tmp_path / "broken.ts"
    bad.write_bytes(b"not a model")
    task = tasks.start_predict(images, model_file=bad, workspace=home)
    status = wait(task)
    assert status.state == "failed"
    assert status.message.startswith("exit 2: error: ") and "broken.ts" in status.message
    assert not task.output.exists()


def test_start_predict_refuses_bad_input_before_starting(predict_setup, tmp_path):
    images, model, _ = predict_setup
    home = tmp_path / "ws"
    with pytest.raises(DataError, match="nowhere"):
        tasks.start_predict(tmp_path / "nowhere", model_file=model, workspace=home)
    with pytest.raises(DataError, match="one of the two"):
        tasks.start_predict(images, model="resnet8", model_file=model, workspace=home)
    with pytest.raises(DataError, match="weights file for resnet8"):
        tasks.start_predict(images, model="resnet8", weights="", workspace=home)
    with pytest.raises(DataError, match="image-size"):
        tasks.start_predict(images, model_file=model, image_size="big", workspace=home)
    assert not (home / tasks.TASKS_DIR).exists()


def test_a_task_killed_without_an_exit_status_is_failed(tmp_path):
    folder = tmp_path / "tasks" / "k"
    folder.mkdir(parents=True)
    (folder / "pid").write_text(str(2**22 + 12345))  # no such process
    status = tasks.task_status(tasks.Task("k", folder, tmp_path / "out.parquet"))
    assert status.state == "failed" and "without an exit status" in status.message
    (tmp_path / "out.parquet").write_bytes(b"")
    assert tasks.task_status(tasks.Task("k", folder, tmp_path / "out.parquet")).state == "done"


def test_the_data_page_predicts_and_the_table_becomes_a_source(predict_setup, monkeypatch):
    images, model, home = predict_setup
    monkeypatch.setenv("KDCORE_HOME", str(home))
    at = page("data").run()
    at.text_input(key="data_images_path").set_value(str(images)).run()
    at.radio(key="data_images_teacher").set_value("file").run()
    at.text_input(key="data_images_model_file").set_value(str(model))
    at.text_input(key="data_images_size").set_value("6")  # new work: not the tasks above
    at.number_input(key="data_images_batch").set_value(2)
    at.button(key="data_images_predict").click().run()
    assert not at.exception and not at.error
    assert at.get("progress") and "Predicting images with" in at.get("progress")[0].proto.text
    (task, _), = at.session_state["data_image_tasks"].values()
    assert wait(task).state == "done"
    at.run()
    assert not at.exception and not at.error
    name = state.prediction_name(task.output)
    assert any(name in s.value for s in at.success)
    bias = open_drill_down(page("teacher_bias"), name, sorted(CLASSES))
    assert not bias.exception and not bias.error
    assert bias.metric[3].value == str(PER_SPLIT["test"] * len(CLASSES))

