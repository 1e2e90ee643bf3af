import contextlib
import os
import signal
import time

import pytest
import torch

from kdcore.data.bundles import load_bundle
from kdcore.store.jobs import execute_run
from kdcore.store.runs import RunStore
from kdcore.value.compare import plan


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty run store for one test, also exported as KDCORE_HOME for subprocesses."""
    ws = tmp_path / "ws"
    monkeypatch.setenv("KDCORE_HOME", str(ws))
    return ws


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workspace, runs): kd and kd+be+br+dl, 2 seeds each, 2 epochs, trained in this process."""
    ws = tmp_path_factory.mktemp("trained") / "ws"
    store = RunStore(ws)
    threads = torch.get_num_threads()
    try:
        ids = [store.create(c.to_dict()) for c in
               plan(load_bundle(None), ["kd", "kd+be+br+dl"], range(2), epochs=2)]
        for run_id in ids:
            execute_run(run_id, workspace=store.workspace)
    finally:
        torch.set_num_threads(threads)  # execute_run pins one thread
    return ws, [store.get(i) for i in ids]


def _processes_under(base: str) -> list[tuple[int, str]]:
    """(pid, command line) of this user's live processes whose KDCORE_HOME or working folder
    is under ``base``: servers and jobs a test started."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry.name}/stat") as fh:
                state, ppid = fh.read().rsplit(")", 1)[1].split()[:2]
            if state == "Z":
                continue
            ppid = int(ppid)
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
        except OSError:
            continue
        home = next((v.split(b"=", 1)[1].decode(errors="replace") for v in env
                     if v.startswith(b"KDCORE_HOME=")), "")
        # multiprocessing's resource tracker (started by a pool in this process) ends with it
        if "multiprocessing" in cmd and ppid == os.getpid():
            continue
        if home.startswith(base) or cwd.startswith(base):
            found.append((int(entry.name), cmd))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind(tmp_path_factory):
    """After the session, no server or job a test started may still run: they are killed,
    and the session fails naming them, so the test that leaked one gets fixed."""
    base = str(tmp_path_factory.getbasetemp())
    yield
    deadline = time.monotonic() + 15  # jobs a test cancelled need a moment to exit
    while (left := _processes_under(base)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if left:
        pytest.fail("processes left behind by the tests (killed now): "
                    + "; ".join(f"{pid} {cmd[:120]}" for pid, cmd in left), pytrace=False)


@pytest.fixture(autouse=True)
def stop_background_tasks(tmp_path_factory):
    """After each test, end the background tasks it started (a page's label check, a predict
    from the Data page): they run in their own process group, so the runner and its command
    go together. A test that needs a task's result waits for it inside the test."""
    base = str(tmp_path_factory.getbasetemp())
    yield
    for pid, cmd in _processes_under(base):
        if "kdcore.store.tasks" in cmd:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
            "kdcore.store.tasks" in cmd or "label-check" in cmd
            for _, cmd in _processes_under(base)):
        time.sleep(0.1)


@pytest.fixture
def batch():
    """Seeded float64 student logits, teacher logits and labels (64 rows, 10 classes): the
    loss tests' shared inputs."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 10, generator=g, dtype=torch.float64) * 3
    t = torch.randn(64, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (64,), generator=g)
    return s, t, y
