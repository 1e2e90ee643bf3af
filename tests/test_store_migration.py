"""A run store written before schema 2 opens migrated: old runs match equal new configs.

``fixtures/store_v0/runs.sqlite`` was written by the code before the reshape (schema 1: dkd's
options as flat ``dkd_*`` fields in every run's config), with

    kdcore.cli train --strategy kd --epochs 2 --seed 0 --workspace DIR
    kdcore.cli train --strategy dkd+be --epochs 2 --seed 0 --workspace DIR

from a checkout at /tmp/oldtree, hence the runs' bundle path below.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import asdict
from pathlib import Path

import pytest

from kdcore.data.bundles import load_bundle
from kdcore.learning.losses import DKD
from kdcore.learning.train import TrainConfig
from kdcore.store.runs import _V1_DKD_FIELDS, SCHEMA_VERSION, RunStore, _config_v2, config_key
from kdcore.store.selection import comparable_groups

FIXTURE = Path(__file__).parent / "fixtures" / "store_v0" / "runs.sqlite"
OLD_BUNDLE = "/tmp/oldtree/sample_data/digits_vendor"
OLD_RUNS = {"kd", "dkd+be"}


@pytest.fixture
def old_store(tmp_path) -> Path:
    """A copy of the fixture store (opening it migrates it in place)."""
    shutil.copy(FIXTURE, tmp_path / "runs.sqlite")
    return tmp_path


def _new_config(strategy: str, **overrides) -> TrainConfig:
    """The config today's code plans for the fixture's runs (seed 0, 2 epochs)."""
    config = TrainConfig.for_bundle(load_bundle(), strategy=strategy,
                                    **{"seed": 0, "epochs": 2, **overrides})
    config.bundle = OLD_BUNDLE
    return config


def test_the_fixture_is_a_schema_1_store_with_flat_dkd_fields(old_store):
    with sqlite3.connect(old_store / "runs.sqlite") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        rows = conn.execute("SELECT strategy, status, config FROM runs").fetchall()
    assert {(strategy, status) for strategy, status, _ in rows} == {
        (s, "done") for s in OLD_RUNS}
    assert all(json.loads(config)["dkd_beta"] == 8.0 for _, _, config in rows)


def test_opening_an_old_store_migrates_its_configs_and_keys(old_store):
    store = RunStore(old_store)
    with sqlite3.connect(store.db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    runs = store.list()
    assert {r.strategy for r in runs} == OLD_RUNS
    for run in runs:
        assert not any(key.startswith("dkd_") for key in run.config)
        assert "method_options" not in run.config  # dkd's defaults are left out
        assert run.config_key == config_key(run.config)
        assert TrainConfig(**run.config).to_dict() == run.config
    RunStore(old_store)  # reopening a migrated store is fine


def test_find_done_returns_the_old_run_for_an_equal_new_config(old_store):
    store = RunStore(old_store)
    for strategy in OLD_RUNS:
        run = store.find_done(_new_config(strategy).to_dict())
        assert run is not None and run.strategy == strategy
    assert store.find_done(_new_config("kd", epochs=3).to_dict()) is None
    assert store.find_done(_new_config("dkd+be", method_options={"beta": 2.0}).to_dict()) is None


def test_old_and_new_runs_land_in_one_comparable_group(old_store):
    store = RunStore(old_store)
    old = store.list()
    for run in old:
        new_id = store.create(_new_config(run.strategy, seed=1).to_dict())
        store.finish(new_id, run.metrics)
    groups = comparable_groups(store.list(status="done"))
    assert len(groups) == 1
    (members,) = groups.values()
    assert {(r.strategy, r.seed) for r in members} == {(s, seed) for s in OLD_RUNS
                                                       for seed in (0, 1)}


def test_a_dkd_run_with_its_own_options_keeps_them_and_others_drop_the_fields():
    custom = TrainConfig(strategy="dkd+be", method_options={"beta": 2.0}).to_dict()
    flat = {k: v for k, v in custom.items() if k != "method_options"}
    old = {**flat, "dkd_alpha": 1.0, "dkd_beta": 2.0, "dkd_warmup": 20}
    assert _config_v2(old) == custom
    kd = TrainConfig(strategy="kd").to_dict()
    assert _config_v2({**kd, "dkd_alpha": 1.0, "dkd_beta": 2.0, "dkd_warmup": 5}) == kd


def test_the_migration_left_out_the_dkd_defaults_of_today():
    # TrainConfig.to_dict leaves DKD's defaults out; changing them needs a new migration
    assert dict(_V1_DKD_FIELDS.values()) == asdict(DKD())
