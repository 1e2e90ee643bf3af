"""Train: queue students as background jobs and watch them live.

The form plans the runs on a data bundle with ``compare.plan``, or on an image folder on the
server with ``TrainConfig.for_images`` (a zoo student, a zoo or program teacher run on every
augmented image, the cifar recipe); ``jobs.queue_runs`` leaves out runs identical to a
finished or an in-flight one and queues the rest, which train a few at a time (one per core),
each in its own detached process (:mod:`kdcore.store.jobs`). Jobs keep going when the tab
closes or the app restarts, and write their progress to the run store, which is all this page
reads; so jobs started from the CLI show up here too.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from kdcore.data.bundles import Bundle
from kdcore.data.images import ImageSource
from kdcore.errors import KDCoreError
from kdcore.learning.image_train import PRESETS
from kdcore.learning.predict import NORMALIZE_PRESETS
from kdcore.learning.strategies import CATALOGUE, DEFAULT_STRATEGIES
from kdcore.learning.train import TrainConfig
from kdcore.store.jobs import (
    LOG_FILE,
    Work,
    cancel_job,
    default_max_jobs,
    plan_work,
    queue_runs,
    start_queued,
)
from kdcore.store.runs import Run, RunStore
from kdcore.store.tasks import IMAGE_ARCHITECTURES, stop_task, task_status
from kdcore.value import figures
from kdcore.value.compare import plan
from kdcore.value.recommend import (
    Search,
    latest_recommendation,
    plan_search,
    read_progress,
    search_task,
    start_search,
)
from kdcore_app import state

RECENT = 10  # finished runs listed under the live panel
REFRESH_S = 2
STARTUP_S = 5  # rough cost of starting a job process (Python, torch, the bundle's arrays)
NORMALISATION_HELP = (
    "How the bias-aware terms are averaged. **batch** (default): each sample weighs 1/batch "
    "size, a steadier signal. **subset**: each part is averaged over its own samples, as in "
    "the paper (and always for btkd); a few wrong samples then weigh a lot."
)
# widget key -> TrainConfig field prefilled from the bundle's training defaults
DEFAULT_FIELDS = {
    "train_epochs": "epochs",
    "train_temperature": "temperature",
    "train_lam": "lam",
    "train_normalisation": "normalisation",
}
MODES = {"bundle": "Data bundle", "images": "Image folder"}
NO_PRESET = "none"
# widget key -> TrainConfig field prefilled from the chosen preset (image folders)
IMAGE_DEFAULT_FIELDS = {
    "train_img_epochs": "epochs",
    "train_img_batch": "batch_size",
    "train_img_normalize": "normalize",
}
TEACHERS = {
    "zoo": "kdcore architecture + weights",
    "file": "model file (TorchScript, torch.export, ONNX)",
    "none": "none (ce only)",
}
DEFAULT_STUDENT, DEFAULT_TEACHER = "resnet8x4", "resnet32x4"  # the paper's CIFAR-100 pair
IMAGE_STRATEGIES = ["kd", "kd+be+br+dl"]  # vanilla KD against the paper's: one run each


@st.cache_data(ttl=30, show_spinner=False)
def seconds_per_epoch(workspace: str, bundle_path: str) -> tuple[float, int] | None:
    """Median training seconds per epoch of recent finished runs on this bundle, and their count."""
    runs = RunStore(workspace).list(status="done", bundle=bundle_path, limit=50)
    rates = [r.metrics["train_seconds"] / r.config["epochs"] for r in runs
             if r.metrics.get("train_seconds") and r.config.get("epochs")]
    return (statistics.median(rates), len(rates)) if rates else None


def selected_bundle() -> Bundle | None:
    name = st.session_state.get("train_bundle")
    if not name:
        st.info("Pick a data bundle to train on.", icon=":material/info:")
        return None
    try:
        return state.source_bundle(name)
    except KDCoreError as exc:
        state.show_error(exc, prefix=f"Bundle {name}: ")
        return None


def prefill_defaults() -> None:
    """Put the chosen bundle's training defaults into the form (on first view and on change)."""
    bundle = selected_bundle()
    if bundle is None:
        return
    try:
        defaults = TrainConfig.for_bundle(bundle)
    except KDCoreError:  # the form says why when it plans the runs (render_form)
        return
    for key, field in DEFAULT_FIELDS.items():
        st.session_state[key] = getattr(defaults, field)


def form_plan(bundle: Bundle) -> list[TrainConfig]:
    """One config per (strategy, seed) from the form; raises DataError for a bad strategy."""
    ss = st.session_state
    return plan(bundle, ss.train_strategies, range(int(ss.train_seeds)),
                epochs=int(ss.train_epochs), temperature=float(ss.train_temperature),
                lam=float(ss.train_lam), normalisation=ss.train_normalisation)


def describe_work(configs: list[TrainConfig], work: Work, data: str | Path) -> str:
    """One line: how many runs, how many to train now, and roughly how long they take (timed
    from earlier runs on the same data)."""
    n_strategies = len({c.strategy for c in configs})
    seeds = len({c.seed for c in configs})
    epochs = configs[0].epochs
    text = (f"**{len(configs)} run{'s' * (len(configs) != 1)}** ({n_strategies} "
            f"strateg{'ies' if n_strategies != 1 else 'y'} × {seeds} seed{'s' * (seeds != 1)}, "
            f"{epochs} epochs each): **{len(work.todo)} to train**")
    if work.reused:
        text += f", {work.reused} already finished with identical settings (reused)"
    if work.in_flight:
        text += f", {work.in_flight} queued or training right now"
    rate = seconds_per_epoch(str(state.store().workspace), str(data))
    if work.todo and rate is not None:
        parallel = min(len(work.todo), default_max_jobs())
        seconds = (rate[0] * epochs + STARTUP_S) * len(work.todo) / parallel
        text += (f". About {_duration(seconds)} on this machine ({parallel} at a time, "
                 f"timed from {rate[1]} earlier runs)")
    return text + "."


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def start(configs: list[TrainConfig]) -> None:
    """Start button handler: queue the new runs; the outcome is shown on rerun."""
    try:
        queued = queue_runs(configs, workspace=state.store().workspace,
                            reuse=st.session_state.train_reuse)
    except (KDCoreError, OSError) as exc:
        st.session_state["train_start_error"] = f"Could not queue the runs: {exc}"
        return
    st.session_state["train_started"] = len(queued)


def render_start_outcome() -> None:
    error = st.session_state.pop("train_start_error", None)
    if error:
        st.error(error, icon=":material/error:")
    started = st.session_state.pop("train_started", 0)
    if started:
        st.success(f"Queued {started} run{'s' * (started > 1)}; {default_max_jobs()} train at "
                   "once, one per CPU core, the rest wait their turn. They keep running if you "
                   "close this tab; follow them below and compare them on **Results**.",
                   icon=":material/rocket_launch:")


def request_cancel(run_id: str) -> None:
    """Cancel button handler: the job stops at its next batch and is marked cancelled."""
    try:
        cancel_job(run_id, workspace=state.store().workspace)
        st.toast(f"Cancelling {run_id}…", icon=":material/cancel:")
    except KDCoreError as exc:
        st.session_state["train_cancel_error"] = f"Could not cancel {run_id}: {exc}"


def render_form() -> None:
    choices = state.bundle_choices()
    st.selectbox("Data bundle", list(choices), key="train_bundle", on_change=prefill_defaults,
                 help="The data, teacher and student architecture to train on. Changing it "
                      "resets the settings below to that bundle's defaults.")
    if "train_epochs" not in st.session_state:
        prefill_defaults()
    bundle = selected_bundle()
    if bundle is None:
        return
    st.session_state.setdefault("train_strategies", list(DEFAULT_STRATEGIES))
    st.session_state.setdefault("train_seeds", 3)
    st.multiselect(
        "Strategies", list(CATALOGUE), key="train_strategies", accept_new_options=True,
        format_func=state.strategy_label,
        help="ce: labels only. kd: vanilla distillation. +be drops the teacher's wrong samples, "
             "+br corrects them (swaps the wrong and the true class), +dl moves from the first "
             "to the second over training. btkd is the paper's exact recipe. You can type "
             "another combination, e.g. kd+br.")
    cols = st.columns(5)
    cols[0].number_input("Seeds per strategy", min_value=1, max_value=20, step=1,
                         key="train_seeds", help="Seeds 0, 1, …: more seeds, surer comparisons.")
    cols[1].number_input("Epochs", min_value=1, max_value=2000, step=1, key="train_epochs")
    cols[2].number_input("Temperature", min_value=0.5, max_value=20.0, step=0.5,
                         key="train_temperature", help="Softens the teacher's outputs (T).")
    cols[3].number_input("Lambda (label weight)", min_value=0.0, max_value=1.0, step=0.05,
                         key="train_lam", help="Weight of the label loss; 1 − λ weighs the "
                                               "distillation term.")
    cols[4].radio("Normalisation", ["batch", "subset"], key="train_normalisation",
                  horizontal=True, help=NORMALISATION_HELP)
    st.checkbox("Reuse finished runs with identical settings", value=True, key="train_reuse",
                help="Training is deterministic per seed, so an identical run adds nothing.")

    if not st.session_state.train_strategies:
        st.warning("Pick at least one strategy.", icon=":material/warning:")
        return
    try:
        configs = form_plan(bundle)
    except KDCoreError as exc:
        state.show_error(exc)
        return
    offer(configs, bundle.path)


def offer(configs: list[TrainConfig], data: str | Path) -> None:
    """What the planned runs mean (new, reused, in flight, how long) and the Start button."""
    try:
        work = plan_work(state.store(), configs, reuse=st.session_state.train_reuse)
    except KDCoreError as exc:
        state.show_error(exc)
        return
    st.markdown(describe_work(configs, work, data))
    if not work.todo and not st.session_state.get("train_started"):
        st.info("Nothing new to train: every run above has finished (see **Results**) or is "
                "queued or training now. Change the settings, or untick reuse to train them "
                "again.", icon=":material/info:")
    st.button("Start training", key="train_start", type="primary", disabled=not work.todo,
              icon=":material/play_arrow:", on_click=start, args=(configs,))
    render_start_outcome()


# ---------------------------------------------------------------- image folders


def prefill_image_defaults() -> None:
    """Put the chosen preset's recipe (or kdcore's defaults without one) into the form."""
    ss = st.session_state
    recipe = {**{f: getattr(TrainConfig, f) for f in IMAGE_DEFAULT_FIELDS.values()},
              **PRESETS.get(ss.get("train_img_preset", "cifar"), {})}
    ss.update({key: recipe[f] for key, f in IMAGE_DEFAULT_FIELDS.items()})
    ss.train_img_normalize = ss.train_img_normalize or "none"


def teacher_changed() -> None:
    """Without a teacher only ce can train; with one, distil (and compare) by default."""
    ss = st.session_state
    if ss.train_img_teacher == "none":
        ss.train_img_strategies = ["ce"]
    elif ss.get("train_img_strategies") == ["ce"]:
        ss.train_img_strategies = list(IMAGE_STRATEGIES)


def _server_path(text: str) -> str:
    """A path typed into the form, absolute on the server ("" stays "": not given)."""
    text = text.strip()
    return str(Path(text).expanduser().resolve()) if text else ""


def teacher_options() -> dict:
    """The teacher fields of the form, as TrainConfig overrides."""
    ss = st.session_state
    if ss.train_img_teacher == "zoo":
        return {"teacher_arch": ss.train_img_teacher_arch,
                "teacher_weights": _server_path(ss.train_img_weights)}
    if ss.train_img_teacher == "file":
        return {"teacher_model": _server_path(ss.train_img_model_file)}
    return {}


def _stamp(path: str) -> int:
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return 0


@st.cache_data(show_spinner="Checking the images and the teacher…", max_entries=16)
def image_plan(folder: str, strategies: tuple[str, ...], seeds: int, options: tuple,
               stamp: tuple) -> list[TrainConfig]:
    """One config per (strategy, seed): the folder, the student and the teacher checked once
    per strategy (:meth:`TrainConfig.for_images`, which reads the folder and loads the
    teacher), and kept while the form, the folder and the teacher's file (``stamp``) stay
    the same, so a rerun of the page does not read them again."""
    configs = []
    for name in strategies:
        config = TrainConfig.for_images(folder, strategy=name, seed=0, **dict(options))
        configs += [replace(config, seed=seed) for seed in range(seeds)]
    return configs


def image_form_plan(source: ImageSource) -> list[TrainConfig]:
    """The image form's runs; raises DataError (one line, with the fix) for bad input."""
    ss = st.session_state
    teacher = teacher_options()
    options = {"student_arch": ss.train_img_student,
               "preset": None if ss.train_img_preset == NO_PRESET else ss.train_img_preset,
               "epochs": int(ss.train_img_epochs), "batch_size": int(ss.train_img_batch),
               "normalize": "" if ss.train_img_normalize == "none" else ss.train_img_normalize,
               "loader_workers": int(ss.train_img_workers), **teacher}
    files = tuple(_stamp(teacher[k]) for k in ("teacher_weights", "teacher_model") if k in teacher)
    return image_plan(str(source.root), tuple(ss.train_img_strategies),
                      int(ss.train_img_seeds), tuple(sorted(options.items())),
                      (state.folder_stamp(source.root), files))


def render_teacher_inputs() -> None:
    ss = st.session_state
    ss.setdefault("train_img_teacher", "zoo")
    st.radio("Teacher", list(TEACHERS), key="train_img_teacher", horizontal=True,
             format_func=TEACHERS.get, on_change=teacher_changed,
             help="The teacher runs on every augmented image the student sees. Without one, "
                  "ce trains the student on the labels alone (for example to make a teacher).")
    if ss.train_img_teacher == "zoo":
        left, right = st.columns([1, 2])
        ss.setdefault("train_img_teacher_arch", DEFAULT_TEACHER)
        left.selectbox("Teacher architecture", IMAGE_ARCHITECTURES, key="train_img_teacher_arch")
        right.text_input("Weights file on the server (.pt state dict, mdistiller checkpoint or "
                         ".safetensors)", key="train_img_weights",
                         placeholder="/data/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth")
    elif ss.train_img_teacher == "file":
        st.text_input("Model file on the server (.ts, .pt2 or .onnx)",
                      key="train_img_model_file",
                      help="Program and ONNX files are code: loading one runs what its author "
                           "wrote, so load only files from people you trust.")


def render_image_form() -> None:
    """Train a zoo student on an image folder (or CIFAR folder) on the server."""
    ss = st.session_state
    folder = st.text_input(
        "Image folder on the server", key="train_img_path", placeholder="/data/cifar-100-python",
        help="train/<class>/… and test/<class>/… images (optionally unlabelled/…), or a "
             "CIFAR-10/100 python-version folder, on the machine kdcore runs on.")
    if not folder.strip():
        st.info("Give the path of an image folder on the server.", icon=":material/info:")
        return
    try:
        source = state.image_source(folder)
    except (KDCoreError, OSError) as exc:
        state.show_error(exc, "Not an image folder: ")
        return
    shape = source.image_shape
    st.caption(f"{len(source.class_names)} classes · "
               + " · ".join(f"{source.n(s):,} {s}" for s in source.splits)
               + (f" · {shape[1]}x{shape[2]} pixels" if shape else " · mixed sizes")
               + f" · {source.root}")
    ss.setdefault("train_img_student", DEFAULT_STUDENT)
    ss.setdefault("train_img_preset", "cifar")
    if "train_img_epochs" not in ss:
        prefill_image_defaults()
    left, right = st.columns(2)
    left.selectbox("Student architecture", IMAGE_ARCHITECTURES, key="train_img_student",
                   help="A network of kdcore's zoo, trained from scratch.")
    right.selectbox("Recipe", [*PRESETS, NO_PRESET], key="train_img_preset",
                    on_change=prefill_image_defaults,
                    format_func=lambda p: ("cifar: mdistiller's CIFAR-100 recipe" if p == "cifar"
                                           else "none: kdcore's defaults" if p == NO_PRESET
                                           else p),
                    help="cifar: SGD (momentum 0.9, weight decay 5e-4), lr 0.05 divided by 10 "
                         "at epochs 150, 180 and 210 of 240, batch 64, random crop (padding "
                         "4) and flip, CIFAR-100 normalisation. Changing it resets the epochs, "
                         "batch size and normalisation below.")
    render_teacher_inputs()
    ss.setdefault("train_img_strategies",
                  ["ce"] if ss.train_img_teacher == "none" else list(IMAGE_STRATEGIES))
    st.multiselect("Strategies", list(CATALOGUE), key="train_img_strategies",
                   accept_new_options=True, format_func=state.strategy_label,
                   help="ce: labels only (no teacher needed). kd: vanilla distillation. The "
                        "bias-aware parts (+be, +br, +dl) split each batch by whether the "
                        "teacher is right on that very augmented image.")
    cols = st.columns(5)
    ss.setdefault("train_img_seeds", 1)
    ss.setdefault("train_img_workers", 0)
    cols[0].number_input("Seeds per strategy", min_value=1, max_value=20, step=1,
                         key="train_img_seeds")
    cols[1].number_input("Epochs", min_value=1, max_value=2000, step=1, key="train_img_epochs")
    cols[2].number_input("Batch size", min_value=1, max_value=4096, step=1,
                         key="train_img_batch")
    cols[3].selectbox("Normalisation", list(NORMALIZE_PRESETS), key="train_img_normalize",
                      help="The mean/std the images are normalised with (pixels in [0, 1] "
                           "first); a teacher needs the one it was trained with.")
    cols[4].number_input("Loader workers", min_value=0, max_value=os.cpu_count() or 1, step=1,
                         key="train_img_workers",
                         help="Processes that decode and augment the images while the "
                              "networks train; 0 does it in the job's own process.")
    st.checkbox("Reuse finished runs with identical settings", value=True, key="train_reuse",
                help="Training is deterministic per seed, so an identical run adds nothing.")
    if not ss.train_img_strategies:
        st.warning("Pick at least one strategy.", icon=":material/warning:")
        return
    missing = {"zoo": ("train_img_weights", "the teacher's weights file"),
               "file": ("train_img_model_file", "the teacher's model file")}.get(
                   ss.train_img_teacher)
    if missing and not ss.get(missing[0], "").strip():
        st.info(f"Give {missing[1]} on the server.", icon=":material/info:")
        return
    try:
        configs = image_form_plan(source)
    except KDCoreError as exc:
        state.show_error(exc)
        return
    offer(configs, source.root)


def seconds_left(run: Run) -> float | None:
    """The time a running job still needs at the pace it has kept so far; None before its
    first progress report."""
    fraction, elapsed = run.fraction, run.duration_s
    if run.status != "running" or not fraction or fraction >= 1 or not elapsed:
        return None
    return elapsed * (1 - fraction) / fraction


def render_job(run: Run, epochs: pd.DataFrame) -> None:
    """One job on one line: what it is, its progress, its latest numbers and Cancel. The same
    elements every refresh, so the Cancel button stays put while the panel updates."""
    with st.container(border=True, key=f"train_job_{run.id}"):
        name, progress, button = st.columns([3, 5, 1.3], vertical_alignment="center")
        name.markdown(f"**{run.strategy}** · seed {run.seed}  \n`{run.id}`")
        fraction = run.fraction or 0.0
        if run.status == "queued":
            progress.progress(0.0, text="queued: starts when a running job ends")
        else:
            total = int(run.config.get("epochs") or 0)
            current = min(int(epochs["epoch"].iloc[-1]) + 2, total) if len(epochs) else 1
            doing = f"epoch {current}/{total}" if fraction or len(epochs) else "loading the data"
            left = seconds_left(run)
            progress.progress(fraction, text=f"{fraction:.0%} · {doing}" + (
                "" if left is None else f" · about {_duration(left)} left"))
        if len(epochs):
            last = epochs.iloc[-1]
            progress.caption(f"after epoch {int(last['epoch']) + 1}: training loss "
                             f"{last['loss']:.3g} · test accuracy {last['test_accuracy']:.1%}")
        else:
            progress.caption("Numbers and curves appear after the first epoch.")
        button.button("Cancelling…" if run.cancel_requested else "Cancel",
                      key=f"train_cancel_{run.id}", on_click=request_cancel, args=(run.id,),
                      disabled=run.cancel_requested, icon=":material/cancel:")


def render_recent(store: RunStore) -> None:
    runs = store.list(status=["done", "failed", "cancelled"], limit=RECENT)
    if not runs:
        return
    st.subheader("Recently finished")
    frame = store.to_frame(runs).sort_values("finished_at", ascending=False)
    frame["finished"] = frame["finished_at"].map(_local_time)
    for column in ("test_accuracy", "best_test_accuracy"):
        frame[column] = 100 * frame[column]
    st.dataframe(
        frame, hide_index=True, key="train_recent", placeholder="—",
        column_order=["finished", "strategy", "seed", "status", "test_accuracy", "duration_s",
                      "error", "id"],
        column_config={
            "finished": "Finished",
            "strategy": "Strategy",
            "seed": "Seed",
            "status": "Status",
            "test_accuracy": st.column_config.NumberColumn("Test accuracy", format="%.1f%%"),
            # Explicit widths: auto-sizing from the first rows cut "Took" off beside a long
            # error message.
            "duration_s": st.column_config.NumberColumn("Took", format="%.0f s", width=80),
            "error": st.column_config.TextColumn("Error", width="large"),
            "id": "Run id",
        })
    for run in runs:
        if run.status == "failed":
            again = (" Start it again above; its log is "
                     f"{store.runs_dir / run.id / LOG_FILE}."
                     if (run.error or "").startswith("interrupted") else "")
            error = (run.error or "no reason recorded").rstrip(".")
            st.error(f"{run.strategy} seed {run.seed} (`{run.id}`) failed: {error}.{again}",
                     icon=":material/error:")


def _local_time(iso: str | None) -> str:
    if not iso:
        return ""
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------- find the best recipe


def begin_search(search: Search) -> None:
    """Button handler: the search runs as ``kdcore recommend`` in a background task."""
    try:
        start_search(search)
    except (KDCoreError, OSError) as exc:
        st.session_state["train_search_error"] = f"Could not start the search: {exc}"


@st.fragment(run_every=REFRESH_S)
def follow_search(search: Search) -> None:
    """The running search: round, runs used, survivors; reruns the page when it ends."""
    if task_status(search_task(search)).state != "running":
        st.rerun(scope="app")
    progress = read_progress(search) or {}
    budget = progress.get("budget_runs") or progress.get("full_grid_runs") or 1
    used, survivors = progress.get("runs_used", 0), progress.get("survivors", [])
    st.progress(min(used / budget, 1.0),
                text=f"round {progress.get('round', 0)} · {progress.get('round_done', 0)} of "
                     f"{progress.get('round_runs', 0)} runs of this round · {used} of {budget} "
                     f"runs used ({progress.get('runs_reused', 0)} reused) · "
                     f"{len(survivors)} candidates left")
    if survivors:
        st.caption("Not told apart yet: " + ", ".join(survivors))
    st.button("Stop the search", key="train_search_stop", icon=":material/cancel:",
              on_click=stop_task, args=(search_task(search),))


def render_recommendation(doc: dict) -> None:
    """The latest search's answer and every candidate's standing."""
    st.success(doc["summary"], icon=":material/emoji_events:")
    rows = [{"recipe": r["recipe"], "accuracy (mean)": r["mean"] * 100, "seeds": r["seeds"],
             "dropped": ("survived" if r["round_dropped"] == "survived"
                         else f"round {r['round_dropped']}"),
             "vs leader when dropped (pts)": (r["delta_vs_leader"]["mean"] * 100
                                              if r["delta_vs_leader"] else None)}
            for r in doc["ranking"]]
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="train_search_ranking",
                 placeholder="—", column_config={
                     "accuracy (mean)": st.column_config.NumberColumn(format="%.1f%%"),
                     "vs leader when dropped (pts)": st.column_config.NumberColumn(
                         format="%+.1f", help="Paired over shared seeds; its interval, "
                                              "Holm-adjusted, lay below zero.")})


def render_search() -> None:
    """Successive halving over the default recipes on the chosen bundle, in the background."""
    st.subheader("Find the best recipe")
    name = st.session_state.get("train_bundle")
    try:
        bundle = state.source_bundle(name) if name else None
        if bundle is None:
            return
        workspace = state.store().workspace
        default = plan_search(bundle, workspace=workspace)
        st.caption(f"Tries {len(default.candidates)} recipes ("
                   f"{', '.join(c.label for c in default.candidates)}) at the bundle's settings: "
                   "each round adds a seed to the recipes still in the race and drops those "
                   "whose paired interval against the leader (Holm-adjusted) lies below zero. "
                   "Finished identical runs are reused.")
        budget = st.number_input(
            "Runs to spend at most", key="train_search_budget",
            min_value=len(default.candidates) * min(2, default.seeds_max),
            max_value=default.full_grid_runs, value=default.budget_runs, step=1,
            help=f"The full grid is {default.full_grid_runs} runs "
                 f"({len(default.candidates)} recipes × {default.seeds_max} seeds).")
        search = plan_search(bundle, workspace=workspace, budget_runs=int(budget))
        latest = latest_recommendation(workspace, bundle.path)
    except KDCoreError as exc:
        state.show_error(exc)
        return
    task = search_task(search)
    status = task_status(task) if task.folder.is_dir() else None
    running = status is not None and status.state == "running"
    st.button("Find the best recipe", key="train_search_start", icon=":material/search:",
              disabled=running, on_click=begin_search, args=(search,))
    error = st.session_state.pop("train_search_error", None)
    if error:
        st.error(error, icon=":material/error:")
    if running:
        follow_search(search)
    elif status is not None and status.state == "failed":
        st.error(f"The search failed: {status.message}", icon=":material/error:")
    if latest:
        render_recommendation(latest)


@st.fragment(run_every=REFRESH_S)
def render_jobs() -> None:
    """The live panel: refreshes itself every few seconds, reading only the store."""
    store = state.store()
    error = st.session_state.pop("train_cancel_error", None)
    if error:
        st.error(error, icon=":material/error:")
    try:
        start_queued(store.workspace)  # the queue goes on even if a job died before its turn
        active = store.list(status=["queued", "running"])
        active.reverse()  # oldest first: the order they start in
        ids = {run.id for run in active}
        before = st.session_state.get("train_active_ids")
        st.session_state["train_active_ids"] = ids
        if before is not None and before - ids:
            # A job ended (done, failed, cancelled): the form outside this fragment counts
            # runs in flight and enables Start, so the whole page reruns once to update it.
            st.rerun(scope="app")
        queued = sum(run.status == "queued" for run in active)
        st.subheader(f"Running now ({len(active) - queued})"
                     + (f" · {queued} queued" if queued else ""))
        if not active:
            st.caption("No job is running. Jobs started here or with `kdcore train` show up "
                       "here, and keep running when you close the tab.")
        epochs = {run.id: store.epochs(run.id) for run in active}
        curves = [frame.assign(job=f"{run.strategy} · seed {run.seed}")
                  for run in active if len(frame := epochs[run.id])]
        if curves:
            st.plotly_chart(figures.job_curves(pd.concat(curves, ignore_index=True)),
                            key="train_live_curves")
        for run in active:
            render_job(run, epochs[run.id])
        render_recent(store)
    except (KDCoreError, OSError) as exc:
        state.show_error(exc)


st.title("Train students")
st.caption(f"Each run trains in its own background process, {default_max_jobs()} at a time, "
           f"and writes to the run store ({state.store().workspace}).")
st.radio("Train on", list(MODES), key="train_mode", horizontal=True, format_func=MODES.get,
         help="A dataset bundle (its teacher's outputs cached), or an image folder on the server "
              "with a vision teacher and student (the teacher run on every augmented image).")
if st.session_state.train_mode == "images":
    render_image_form()
else:
    render_form()
    render_search()
render_jobs()
