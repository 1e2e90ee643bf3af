"""kdcore.learning.allocator: glibc's thresholds are fixed where glibc is the C library."""

import platform
import subprocess
import sys

import pytest

from kdcore.learning.allocator import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_thresholds():
    # in a child process, so the test run's own allocator is left as it is
    code = "from kdcore.learning.allocator import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_elsewhere_it_says_so_instead_of_failing(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keep_freed_memory() is False
