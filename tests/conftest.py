import pytest


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty run store for one test, also exported as KDCORE_HOME for subprocesses."""
    ws = tmp_path / "ws"
    monkeypatch.setenv("KDCORE_HOME", str(ws))
    return ws
