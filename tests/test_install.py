"""kdcore installed like real software: a wheel in a fresh virtual environment, used elsewhere.

The other tests run against the editable install, where a module missing from the wheel, or
code that finds the app or the sample through the repository's layout, still works. Here the
wheel is built from a copy of the sources (so the checkout gets no build/ or egg-info and no
stale build output slips in), installed into a new venv, and run from an empty folder. The
venv reaches this interpreter's packages (torch, streamlit, ...) through a .pth file written
after the install, so nothing is downloaded and pip never sees the editable kdcore.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path
from urllib.request import urlopen

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "kdcore", "dashboard", "sample_data")
# Where the repository's folders land in the wheel (pyproject.toml's package-dir).
INSTALLED_AS = {"kdcore": "kdcore", "dashboard": "kdcore_app", "sample_data": "kdcore/sample_data"}
HEALTH_S = 90


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600,
                          **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation",
          "--no-index", "-w", tmp / "dist"])
    (found,) = (tmp / "dist").glob("kdcore-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A venv holding only the wheel; its dependencies come from this interpreter's packages."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          wheel])
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib.stdout.strip()) / "kdcore_test_deps.pth").write_text("\n".join(sorted(deps)))
    return venv


@pytest.fixture
def elsewhere(tmp_path) -> dict:
    """Keyword arguments that run a command from an empty folder, away from the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["KDCORE_HOME"] = str(tmp_path / "ws")
    (tmp_path / "cwd").mkdir()
    return {"cwd": tmp_path / "cwd", "env": env}


def test_the_wheel_holds_every_module_the_app_and_the_sample(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    expected = {f"{INSTALLED_AS[folder]}/{path.relative_to(ROOT / folder).as_posix()}"
                for folder in INSTALLED_AS for path in (ROOT / folder).rglob("*")
                if path.is_file() and (path.suffix == ".py" or folder == "sample_data")
                and "__pycache__" not in path.parts}
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"


def test_the_installed_copy_is_used_and_finds_its_sample(venv, elsewhere):
    code = ("import json, kdcore, kdcore_app; from kdcore.data.bundles import sample_bundle_path;"
            "print(json.dumps([kdcore.__file__, kdcore_app.__file__, str(sample_bundle_path())]))")
    paths = json.loads(_run([venv / "bin" / "python", "-c", code], **elsewhere).stdout)
    assert all(Path(p).is_relative_to(venv) for p in paths), paths
    assert (Path(paths[2]) / "manifest.json").is_file()


def test_kdcore_demo_help_and_analyze_from_another_folder(venv, elsewhere):
    kdcore = venv / "bin" / "kdcore"
    assert "usage: kdcore demo" in _run([kdcore, "demo", "--help"], **elsewhere).stdout
    doc = json.loads(_run([kdcore, "analyze", "--json"], **elsewhere).stdout)
    assert doc["n_classes"] == 10 and doc["n_samples"] > 0


def test_every_installed_page_renders(venv, elsewhere):
    code = """if True:
        import sys
        from importlib import resources
        from streamlit.testing.v1 import AppTest
        app = resources.files("kdcore_app")
        for page in sorted(p.name for p in (app / "app_pages").iterdir() if p.name.endswith(".py")):
            at = AppTest.from_file(str(app / "app.py"), default_timeout=120)
            at.switch_page(f"app_pages/{page}")
            at.run()
            if at.exception:
                sys.exit(f"{page}: {at.exception[0].value}")
            print(page)
        """
    out = _run([venv / "bin" / "python", "-c", code], **elsewhere).stdout
    assert "overview.py" in out.split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urlopen(url, timeout=2) as response:
            return response.read().decode().strip() == "ok"
    except OSError:
        return False


def test_kdcore_dashboard_serves_from_another_folder(venv, elsewhere):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/_stcore/health"
    log = elsewhere["cwd"].parent / "dashboard.log"
    with log.open("w") as out:
        # its own session (process group), so it and anything it started stop together
        proc = subprocess.Popen([venv / "bin" / "kdcore", "dashboard", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                **elsewhere)
    try:
        deadline = time.monotonic() + HEALTH_S
        while not _healthy(url):
            if proc.poll() is not None:
                pytest.fail(f"kdcore dashboard exited with {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no answer from {url} within {HEALTH_S} s: {log.read_text()}")
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
