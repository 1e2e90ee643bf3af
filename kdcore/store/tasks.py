"""Background tasks: one kdcore command run in its own process, whose result is a file.

The dashboard must not fork nor import torch, yet a user can ask it for work that needs both
(``kdcore predict`` over an image folder). :func:`start_task` runs such a command the way
training jobs run (:mod:`kdcore.store.jobs`): a detached ``python -m kdcore ...`` in its own
session, its output in a log. A small runner process (this module's ``__main__``) waits for
the command and records its exit status next to the log, so :func:`task_status` can say
*failed, exit 2: <the command's one-line error>* after the app restarted, not just "gone".

A task is keyed by its command line, which names what it computes: asking again for the same
key reuses the finished output, or the task still running, and never starts a second process.
Its files live under ``<workspace>/tasks/<key>/``; its output goes where the caller says
(predictions: ``<workspace>/predictions/``).

This module imports neither torch nor the run store: pages may import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kdcore.errors import DataError
from kdcore.learning.predict import make_preprocess, prediction_cache_path
from kdcore.workspace import resolve_workspace

TASKS_DIR = "tasks"
PREDICTIONS_DIR = "predictions"
# The zoo's image architectures, as kdcore.learning.model_files.image_architectures() lists
# them (it imports torch): named here for pages, which may not. A test keeps the two equal.
IMAGE_ARCHITECTURES = ("cnn", "mobilenetv2", "resnet110", "resnet14", "resnet18", "resnet20",
                       "resnet32", "resnet32x4", "resnet44", "resnet56", "resnet8", "resnet8x4",
                       "shufflenetv2", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")
_SPEC, _PID, _EXIT, _LOG = "task.json", "pid", "exit", "log"

State = Literal["running", "done", "failed"]


@dataclass(frozen=True)
class Task:
    """A started (or reused) task: where its files are. Holds no process handle, so it can be
    kept in a browser session and read back by any process."""

    key: str
    folder: Path  # <workspace>/tasks/<key>: task.json, pid, exit, log
    output: Path

    @property
    def log(self) -> Path:
        return self.folder / _LOG


@dataclass(frozen=True)
class TaskStatus:
    state: State
    message: str  # failed: "exit N: <last line of the log>"; running: the last line, if any
    seconds: float  # how long it ran (so far)


def task_key(argv: Sequence[str]) -> str:
    """The key of running ``kdcore <argv>`` (16 hex digits)."""
    return hashlib.sha256(json.dumps(list(argv)).encode("utf-8")).hexdigest()[:16]


def start_task(argv: Sequence[str], *, output: str | Path,
               workspace: str | Path | None = None) -> Task:
    """Run ``python -m kdcore <argv>`` in a detached process that writes ``output``; returns
    at once. One command line is one task: its finished output or its running process is
    reused, a failed one is retried. So ``argv`` must name what makes the work new (predict:
    an output path named by a digest of the images, the teacher's files and the options)."""
    folder = resolve_workspace(workspace) / TASKS_DIR / task_key(argv)
    task = Task(key=folder.name, folder=folder, output=Path(output))
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as lock:  # one launcher at a time per key
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _status(task, grace_s=0).state != "failed":  # running, or its output is there
            return task
        for name in (_PID, _EXIT, _LOG):
            (folder / name).unlink(missing_ok=True)
        task.output.parent.mkdir(parents=True, exist_ok=True)
        spec = {"argv": [sys.executable, "-m", "kdcore", *argv], "output": str(task.output),
                "started": time.time()}
        (folder / _SPEC).write_text(json.dumps(spec, indent=1))
        proc = subprocess.Popen(
            [sys.executable, "-m", "kdcore.store.tasks", str(folder)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        _write(folder / _PID, str(proc.pid))
    return task


NICENESS = 10  # a task's command runs at this lower CPU priority (inherited by its process)
STARTING_S = 30.0  # a task folder without a process yet counts as starting for this long


def task_status(task: Task) -> TaskStatus:
    """running (its runner lives, or it is being started), done (its output exists: written
    whole, or not at all, by the command) or failed (the exit status and the command's last
    line of output)."""
    return _status(task, grace_s=STARTING_S)


def _status(task: Task, *, grace_s: float) -> TaskStatus:
    started = float(_read_json(task.folder / _SPEC).get("started", time.time()))
    pid = _read(task.folder / _PID)
    if pid is not None and _alive(int(pid)):  # (which reaps it once it ended)
        return TaskStatus("running", last_line(task.log), time.time() - started)
    if (pid is None and _read(task.folder / _EXIT) is None and not task.output.is_file()
            and time.time() - _mtime(task.folder, default=0.0) < grace_s):
        # A launcher made the folder and is starting the process (or a page's thread is
        # about to): not a failure yet.
        return TaskStatus("running", "starting", 0.0)
    code = _read(task.folder / _EXIT)
    seconds = max(0.0, _mtime(task.folder / _EXIT, default=started) - started)
    if code in (None, "0") and task.output.is_file():  # None: made by someone else (analyze)
        return TaskStatus("done", "", seconds)
    if code is None:
        return TaskStatus("failed", "its process ended without an exit status (killed?); "
                          f"see {task.log}" if pid else "it was never started", seconds)
    line = last_line(task.log) or "no output"
    return TaskStatus("failed", f"exit {code}: {line}", seconds)


def stop_task(task: Task, *, wait_s: float = 5.0) -> bool:
    """End a running task: its runner's process group (the runner and its command), waiting
    up to ``wait_s`` for them to go. True when one was running. Its output, written whole or
    not at all, is not there then; asking for the task again starts it anew."""
    pid = _read(task.folder / _PID)
    if pid is None or not _alive(int(pid)):
        return False
    try:
        os.killpg(int(pid), signal.SIGTERM)  # start_new_session: the runner leads its group
    except (ProcessLookupError, PermissionError):
        return False
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and (_alive(int(pid)) or _group_alive(int(pid))):
        time.sleep(0.05)
    return True


def stop_tasks(workspace: str | Path | None = None) -> int:
    """Stop every running task of a workspace (a test's teardown, a shutdown); how many."""
    folder = resolve_workspace(workspace, create=False) / TASKS_DIR
    if not folder.is_dir():
        return 0
    found = [Task(key=f.name, folder=f, output=Path(_read_json(f / _SPEC).get("output", f)))
             for f in folder.iterdir() if f.is_dir()]
    return sum(stop_task(t) for t in found)


def last_line(path: Path, *, max_bytes: int = 4096) -> str:
    """The last non-empty line of a log (progress bars' carriage returns count as line ends)."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - max_bytes))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.replace("\r", "\n").split("\n")]
    return next((line for line in reversed(lines) if line), "")


# ---------------------------------------------------------------------------------- predict


def start_predict(images: str | Path, *, model: str | None = None,
                  weights: str | Path | None = None, model_file: str | Path | None = None,
                  batch_size: int | None = None, image_size: str | None = None,
                  normalize: str | None = None, workspace: str | Path | None = None) -> Task:
    """``kdcore predict`` over an image folder (or CIFAR folder) as a background task. The
    teacher is a zoo ``model`` with its ``weights`` file, or a ``model_file`` (.ts, .pt2,
    .onnx); ``image_size`` is ``"H"`` or ``"H,W"``. The output is the one ``kdcore analyze
    IMAGES`` keeps (:func:`~kdcore.learning.predict.prediction_cache_path`), so either reuses
    what the other predicted. Inputs are checked here: a typo is one line now, not a failed
    task later. Progress goes to the task's log (its last line says how far it got)."""
    images = _existing(images, "image folder", "give the folder that holds train/ and test/ "
                       "(or a CIFAR python-version folder)")
    model, weights, model_file = (str(v).strip() or None if v is not None else None
                                  for v in (model, weights, model_file))
    if (model_file is None) == (model is None):
        raise DataError("give the teacher as a zoo architecture with its weights file or as a "
                        "model file (.ts, .pt2, .onnx), one of the two")
    if model_file is not None:
        model_file = _existing(model_file, "model file", "export the teacher as a TorchScript "
                               "(.ts), torch.export (.pt2) or ONNX (.onnx) file")
    else:
        weights = _existing(weights or "", f"weights file for {model}", "give the state dict "
                            "(.pt) or .safetensors file it was trained to")
    preprocess = make_preprocess(normalize=normalize, image_size=(image_size or "").strip()
                                 or None)
    out = prediction_cache_path(resolve_workspace(workspace), images, arch=model,
                                weights=weights, model_file=model_file, preprocess=preprocess)
    argv = ["predict", str(images), "--out", str(out)]
    if model_file is not None:
        argv += ["--model-file", str(model_file)]
    else:
        argv += ["--model", model, "--weights", str(weights)]
    if batch_size is not None:
        if int(batch_size) < 1:
            raise DataError(f"batch size {batch_size} must be at least 1")
        argv += ["--batch-size", str(int(batch_size))]
    if preprocess.size is not None:
        argv += ["--image-size", ",".join(map(str, preprocess.size))]
    argv += ["--normalize", preprocess.normalize]
    return start_task(argv, output=out, workspace=workspace)


# ---------------------------------------------------------------------------------- helpers


def _existing(path: str | Path, what: str, fix: str) -> Path:
    text = str(path).strip()
    found = Path(text).expanduser().resolve() if text else None
    if found is None or not found.exists():
        raise DataError(f"{what} {text or '(empty)'}: no such file or folder on the server; {fix}")
    return found


def _write(path: Path, text: str) -> None:
    """Write whole or not at all (a reader never sees half a pid or exit status)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _mtime(path: Path, *, default: float) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return default


def _alive(pid: int) -> bool:
    """Whether the process lives; a child of this process that ended is reaped here."""
    if _reap(pid):
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or a recycled pid: not ours
        return False
    try:  # a zombie (ended, its parent has not reaped it yet) counts as ended
        with open(f"/proc/{pid}/stat") as fh:
            zombie = fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
    if zombie:
        _reap(pid)
    return not zombie


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _reap(pid: int) -> bool:
    """Reap ``pid`` if it is an ended child of this process (the app's runners); True then."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # not our child
        return False


def _run(folder: Path) -> int:
    """The runner: the task's command with its output in the log, then its exit status."""
    spec = json.loads((folder / _SPEC).read_text())
    code = 1
    with contextlib.suppress(OSError):  # background work yields the cores to the app in use:
        os.nice(NICENESS)               # the page and the browser drawing it come first
    try:
        with (folder / _LOG).open("ab") as log:
            code = subprocess.call(spec["argv"], stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
    finally:
        _write(folder / _EXIT, str(code))
    return code


if __name__ == "__main__":
    sys.exit(_run(Path(sys.argv[1])))
