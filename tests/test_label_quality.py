"""Label errors vs teacher bias: detection (cleanlab), the analysis keys, overrides and ``+lq``."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from streamlit.testing.v1 import AppTest

from kdcore.analysis.analyzer import analyze, analyze_path, assess_table
from kdcore.analysis.label_quality import LABEL_ERROR, TEACHER_BIAS, assess
from kdcore.data.bundles import load_bundle, sample_bundle_path
from kdcore.data.sources import bundle_table, load_predictions, source_key
from kdcore.errors import DataError
from kdcore.learning.losses import PARTS, UNLABELLED, parse_strategy, strategy_loss, swap_rectify
from kdcore.learning.train import TrainConfig, likely_label_errors
from kdcore.store.overrides import attach, load_overrides, set_override

SAMPLE_KEY = source_key(load_predictions(None))  # the bundled sample's overrides
PAGE = Path(__file__).resolve().parents[1] / "dashboard" / "app_pages" / "teacher_bias.py"


def _blobs(n_per_class=30, k=4, seed=0):
    """Well separated clusters: features, true labels, a teacher confidently right."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 8, size=(k, 5))
    y = np.repeat(np.arange(k), n_per_class)
    x = centres[y] + rng.normal(0, 1, size=(len(y), 5))
    teacher = np.full((len(y), k), -4.0)
    teacher[np.arange(len(y)), y] = 6.0
    return x, y, teacher


def test_flipped_labels_with_a_confident_right_teacher_are_label_errors():
    x, y, teacher = _blobs()
    noisy = y.copy()
    flipped = np.array([3, 40, 77, 100, 115])
    noisy[flipped] = (y[flipped] + 1) % 4
    lq = assess(noisy, teacher, features=x)
    assert lq.available
    assert set(np.flatnonzero(lq.likely_label_error)) == set(flipped)
    verdict = lq.verdict
    assert all(verdict[flipped] == LABEL_ERROR)
    assert all(verdict[np.setdiff1d(np.arange(len(y)), flipped)] == "")  # teacher right
    assert lq.label_quality[flipped].max() < np.delete(lq.label_quality, flipped).min()
    doc = lq.to_dict()
    assert doc["count"] == 5 and sum(c["count"] for c in doc["per_class"]) == 5


def test_a_systematic_teacher_mistake_on_right_labels_is_teacher_bias():
    x, y, teacher = _blobs()
    wrong = np.flatnonzero(y == 2)[:6]  # the teacher reads six 2s as 3, the labels are right
    teacher[wrong] = teacher[wrong][:, [0, 1, 3, 2]]
    lq = assess(y, teacher, features=x)
    assert lq.teacher_wrong.sum() == 6 and not lq.likely_label_error.any()
    assert all(lq.verdict[wrong] == TEACHER_BIAS)


def test_without_held_out_predictions_it_says_why():
    _, y, teacher = _blobs()
    lq = assess(y, teacher)
    assert not lq.available and "held-out" in lq.reason
    assert lq.to_dict() == {"available": False, "reason": lq.reason}
    held = assess(y, teacher, held_out=True)  # the teacher's outputs on rows it never saw
    assert held.available and not held.likely_label_error.any()


def test_analyze_json_on_the_sample_has_likely_label_errors():
    out = subprocess.run([sys.executable, "-m", "kdcore", "analyze", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    lq = doc["likely_label_errors"]
    assert lq["available"] and {"count", "per_class", "method", "note"} <= set(lq)
    assert len(lq["per_class"]) == 10
    train = doc["splits"]["train"]
    assert train["likely_label_errors"]["n_teacher_wrong"] == 5
    # the sample's train labels were verified: its five mistakes are the teacher's bias
    assert train["likely_label_errors"]["count"] == 0
    for record in doc["per_class"]:
        assert record["label_error_rate"] + record["teacher_bias_rate"] == pytest.approx(
            record["bias_rate"])


def test_a_table_without_held_out_predictions_is_not_assessed(tmp_path):
    bundle = load_bundle()
    df = pd.DataFrame(bundle.teacher_logits("train"),
                      columns=[f"logit_{c}" for c in bundle.class_names])
    df.insert(0, "label", bundle.y("train"))
    path = tmp_path / "train_only.csv"
    df.to_csv(path, index=False)
    doc = analyze_path(path)
    assert doc["likely_label_errors"]["available"] is False
    assert "held-out" in doc["likely_label_errors"]["reason"]
    assert doc["per_class"][0]["label_error_rate"] is None
    # the same rows marked as held out (split = test) are assessed from the teacher's outputs
    df["split"] = "test"
    df.to_csv(path, index=False)
    assert analyze_path(path)["likely_label_errors"]["available"] is True


def test_overrides_round_trip_and_apply_in_analysis(tmp_path):
    ws = tmp_path / "ws"
    assert load_overrides(ws, SAMPLE_KEY) == {}
    assert not ws.exists()  # reading never creates the workspace
    bundle = load_bundle()
    wrong = np.flatnonzero(bundle.teacher_logits("train").argmax(1) != bundle.y("train"))
    key = f"train:{wrong[0]}"
    set_override(ws, SAMPLE_KEY, key, LABEL_ERROR)
    assert load_overrides(ws, SAMPLE_KEY) == {key: LABEL_ERROR}
    doc = analyze_path(None, split="train", overrides=load_overrides(ws, SAMPLE_KEY))
    assert doc["likely_label_errors"]["count"] == 1
    assert doc["likely_label_errors"]["n_overridden"] == 1
    out = subprocess.run([sys.executable, "-m", "kdcore", "analyze", "--split", "train", "--json",
                          "--workspace", str(ws)], capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout)["likely_label_errors"] == doc["likely_label_errors"]  # the CLI
    lq = assess_table(load_predictions(None).subset("train"), overrides={key: LABEL_ERROR})
    assert not lq.available  # without inputs the table alone cannot be assessed...
    set_override(ws, SAMPLE_KEY, key, TEACHER_BIAS)
    overrides = load_overrides(ws, SAMPLE_KEY)
    assert analyze_path(None, split="train", overrides=overrides)["likely_label_errors"][
        "count"] == 0
    set_override(ws, SAMPLE_KEY, key, None)
    assert load_overrides(ws, SAMPLE_KEY) == {}
    with pytest.raises(DataError):
        set_override(ws, SAMPLE_KEY, key, "maybe")


def test_overrides_apply_in_training_and_are_recorded_in_the_config(tmp_path):
    ws = tmp_path / "ws"
    bundle = load_bundle()
    wrong = np.flatnonzero(bundle.teacher_logits("train").argmax(1) != bundle.y("train"))
    suspect, info = likely_label_errors(bundle)
    assert info["lq_flagged"] == 0 and not suspect.any()
    set_override(ws, SAMPLE_KEY, f"train:{wrong[1]}", LABEL_ERROR)
    config = attach(TrainConfig.for_bundle(bundle, strategy="kd+be+br+dl+lq"), ws)
    assert config.label_overrides == {f"train:{wrong[1]}": LABEL_ERROR}
    assert config.to_dict()["label_overrides"] == config.label_overrides
    suspect, info = likely_label_errors(bundle, config.label_overrides)
    assert np.flatnonzero(suspect).tolist() == [wrong[1]] and info["lq_flagged"] == 1
    plain = attach(TrainConfig.for_bundle(bundle, strategy="kd+be+br+dl"), ws)
    assert "label_overrides" not in plain.to_dict() and "lq_drop_ce" not in plain.to_dict()


def test_overrides_follow_the_data_not_its_name(tmp_path, monkeypatch):
    """A verdict set on the Teacher bias page applies to that data in ``+lq`` training and in
    ``analyze``, and never to another bundle of the same name in another folder."""
    ws = tmp_path / "ws"
    monkeypatch.setenv("KDCORE_HOME", str(ws))
    at = AppTest.from_file(str(PAGE), default_timeout=90).run()
    at.radio(key="bias_split").set_value("train").run()
    deadline = time.monotonic() + 180  # the verdicts come from a task process, after the charts
    while not _verdict_boxes(at) and not at.warning and time.monotonic() < deadline:
        time.sleep(0.5)
        at.run()
    box = _verdict_boxes(at)[0]
    box.set_value(LABEL_ERROR).run()
    assert not at.exception
    sample = attach(TrainConfig.for_bundle(load_bundle(), strategy="kd+be+br+dl+lq"), ws)
    assert list(sample.label_overrides.values()) == [LABEL_ERROR]  # the page's key is +lq's

    other = tmp_path / "elsewhere" / "digits_vendor"  # a copy with one teacher output changed
    shutil.copytree(sample_bundle_path(), other)
    with np.load(other / "data.npz") as data:
        arrays = {key: data[key] for key in data.files}
    arrays["teacher_logits_test"][0, 0] += 1.0
    np.savez_compressed(other / "data.npz", **arrays)
    assert load_bundle(other).name == load_bundle().name
    copy = attach(TrainConfig.for_bundle(load_bundle(other), strategy="kd+be+br+dl+lq"), ws)
    assert copy.label_overrides == {}
    for path, n_overridden in ((other, 0), (sample_bundle_path(), 1)):
        out = subprocess.run([sys.executable, "-m", "kdcore", "analyze", str(path), "--split",
                              "train", "--json", "--workspace", str(ws)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["likely_label_errors"]["n_overridden"] == n_overridden


def _verdict_boxes(at: AppTest) -> list:
    return [s for s in at.selectbox if str(s.key or "").startswith("bias_verdict_")]


def test_analyze_keeps_its_old_keys_without_label_quality():
    table = bundle_table(load_bundle())
    assert "likely_label_errors" not in analyze(table)


# ----------------------------------------------------------------------------- +lq in the loss


def test_parse_lq():
    s = parse_strategy("kd+lq+dl+br+be")
    assert s.lq and s.name == "kd+be+br+dl+lq"
    assert PARTS == ("be", "br", "dl", "lq")
    assert parse_strategy("dkd+be+lq").name == "dkd+be+lq"
    for bad in ("kd+lq", "kd+dl+lq", "ce+lq", "kd+be+lq+lq"):
        with pytest.raises(DataError):
            parse_strategy(bad)
    btkd = parse_strategy("btkd")
    assert not btkd.lq and btkd.name == "kd+be+br+dl"


def _batch():
    torch.manual_seed(0)
    s = torch.randn(6, 4, requires_grad=True)
    t = torch.randn(6, 4) * 3
    pred = t.argmax(1)
    y = pred.clone()
    y[0], y[1] = (pred[0] + 1) % 4, (pred[1] + 2) % 4  # rows 0 and 1: teacher wrong
    y[5] = UNLABELLED
    return s, t, y


def test_flagged_wrong_rows_keep_the_original_teacher():
    s, t, y = _batch()
    suspect = torch.tensor([True, False, True, False, False, False])  # row 2 is right: no effect
    strat = parse_strategy("kd+be+br+lq")
    lq = strategy_loss(s, t, y, strategy=strat, epoch=0, epochs=1, suspect=suspect)
    # the same loss by hand: row 0 distilled from the original teacher, row 1 rectified
    teacher = t.clone()
    safe = y.clamp(min=0)
    teacher[1] = swap_rectify(t, safe)[1]
    log_s, log_t = F.log_softmax(s / 4, 1), F.log_softmax(teacher / 4, 1)
    kd = (log_t.exp() * (log_t - log_s)).sum(1) * 16
    labelled = y != UNLABELLED
    ce = F.cross_entropy(s[labelled], y[labelled])
    expected = 0.5 * ce + 0.5 * kd.sum() / 6
    assert torch.allclose(lq.total, expected)
    assert lq.n_wrong == 1  # only row 1 counts as teacher bias
    # without +lq the suspect mask is ignored
    plain = strategy_loss(s, t, y, strategy=parse_strategy("kd+be+br"), epoch=0, epochs=1,
                          suspect=suspect)
    assert plain.n_wrong == 2 and not torch.allclose(plain.total, lq.total)


def test_lq_drop_ce_gives_flagged_rows_zero_ce_weight():
    s, t, y = _batch()
    suspect = torch.tensor([True, False, False, False, False, False])
    strat = parse_strategy("kd+be+br+lq")
    loss = strategy_loss(s, t, y, strategy=strat, epoch=0, epochs=1, suspect=suspect,
                         drop_ce=True)
    expected_ce = F.cross_entropy(s[1:5], y[1:5])
    assert loss.ce == pytest.approx(float(expected_ce.detach()), rel=1e-6)
    loss.total.backward()
    # with lam = 1 the only gradient on row 0 would come from CE: it must be zero
    s.grad = None
    only_ce = strategy_loss(s, t, y, strategy=strat, epoch=0, epochs=1, suspect=suspect,
                            drop_ce=True, lam=1.0)
    only_ce.total.backward()
    assert torch.count_nonzero(s.grad[0]) == 0 and torch.count_nonzero(s.grad[1]) > 0


def test_lq_with_every_labelled_row_flagged_is_finite():
    s, t, y = _batch()
    y = torch.where(y == UNLABELLED, y, (t.argmax(1) + 1) % 4)  # every labelled row wrong
    suspect = torch.ones(6, dtype=torch.bool)
    for strat in ("kd+be+br+dl+lq", "dkd+be+lq", "kd+be+br+lq"):
        parts = parse_strategy(strat, normalisation="subset")
        for drop in (False, True):
            out = strategy_loss(s, t, y, strategy=parts, epoch=3, epochs=5, suspect=suspect,
                                drop_ce=drop)
            assert torch.isfinite(out.total) and out.n_wrong == 0


def test_cli_train_with_lq(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "kdcore", "train", "--strategy", "kd+be+br+dl+lq",
         "--epochs", "2", "--json", "--quiet", "--workspace", str(tmp_path / "ws")],
        capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["strategy"] == "kd+be+br+dl+lq"
    assert doc["lq_teacher_wrong"] == 5 and doc["lq_flagged"] == 0
    assert 0.0 <= doc["test_accuracy"] <= 1.0


def test_the_label_check_never_opens_a_process_pool(monkeypatch):
    """A pool forks the multi-threaded dashboard server, which can deadlock it for good."""
    import multiprocessing.pool

    def refuse(*args, **kwargs):
        raise AssertionError("the label check opened a multiprocessing pool")

    monkeypatch.setattr(multiprocessing.pool.Pool, "__init__", refuse)
    x, y, teacher = _blobs()
    assert assess(y, teacher, features=x).available


SOAK = """
import sys, threading
from kdcore.analysis.analyzer import assess_table, select
from kdcore.data.bundles import load_bundle
from kdcore.data.sources import bundle_features, bundle_table

bundle = load_bundle()
table = bundle_table(bundle)
features = bundle_features(bundle)[table.split == "test"]

def check():  # what the Teacher-bias page runs, from a thread as Streamlit does
    for i in range(int(sys.argv[1])):
        assert assess_table(select(table, "test"), features=features).available
        print(i + 1, flush=True)

busy = threading.Thread(target=lambda: threading.Event().wait(600), daemon=True)
busy.start()  # the server has other threads alive while a page runs
worker = threading.Thread(target=check)
worker.start()
worker.join()
"""


@pytest.mark.slow
def test_the_label_check_runs_200_times_in_a_threaded_process_without_hanging():
    """A hang is a round that does not finish: each round gets 60 s (one takes ~0.2 s idle),
    so a loaded machine slows the test down but cannot fail it."""
    import queue
    import threading

    proc = subprocess.Popen([sys.executable, "-c", SOAK, "200"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # the process ended

    threading.Thread(target=read, daemon=True).start()
    done = 0
    try:
        while done < 200:
            try:
                line = lines.get(timeout=60)
            except queue.Empty:
                pytest.fail(f"the label check hung after {done} rounds")
            if line is None:
                break
            done = int(line)
    finally:
        proc.kill()
        proc.wait()
    assert done == 200, proc.stderr.read()[-2000:]
