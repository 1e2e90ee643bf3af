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
