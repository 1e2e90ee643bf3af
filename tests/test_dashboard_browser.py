"""The dashboard in a real browser: the server starts, every page renders, nothing raises.

AppTest runs pages without a browser; this test catches what only a served app shows (the
router, static assets, a page that breaks on the wire). Skips without Playwright or Chromium.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
PAGES = {"": "Can the student beat its biased teacher?", "teacher_bias": "Teacher bias",
         "train": "Train students", "results": "Results", "roi": "Is the student worth it?",
         "data": "Data"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained):
    workspace, _ = trained
    port = _free_port()
    env = {**os.environ, "KDCORE_HOME": str(workspace)}
    proc = subprocess.Popen([sys.executable, "-m", "kdcore", "dashboard", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the dashboard did not answer /_stcore/health within 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.browser
def test_every_page_renders_in_chromium(server):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for path, heading in PAGES.items():
            page.goto(f"{server}/{path}")
            page.get_by_text(heading, exact=False).first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)  # let the rest of the script finish
            assert page.locator("[data-testid='stException']").count() == 0, path
        browser.close()
