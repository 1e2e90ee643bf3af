"""Train: start students as background jobs and watch them live.

Each run is its own ``python -m kdcore.store.jobs RUN_ID`` process
(``kdcore.store.jobs.start_job``): it keeps going when the tab closes or the app restarts,
and it writes its progress to the run store, which is all this page reads. So jobs started from
the CLI show up here too.
"""

from __future__ import annotations

import os
import statistics
from datetime import datetime, timezone

import pandas as pd
import streamlit as st

from dashboard import charts, state
from kdcore.data.bundles import Bundle
from kdcore.errors import KDCoreError
from kdcore.learning.train import TrainConfig
from kdcore.store.jobs import LOG_FILE, cancel_job, start_job
from kdcore.store.runs import Run, RunStore, config_key
from kdcore.value.compare import DEFAULT_STRATEGIES

STRATEGIES = (*DEFAULT_STRATEGIES, "kd+be+br+dl+lq", "dkd", "dkd+be", "dkd+be+br", "dkd+be+br+dl",
              "btkd")
MANY_AT_ONCE = 10  # warn above this many processes started together
RECENT = 10  # finished runs listed under the live panel
REFRESH_S = 2
SLOW_START_S = 60  # a queued job older than this gets a pointer to its log
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
    defaults = TrainConfig.for_bundle(bundle)
    for key, field in DEFAULT_FIELDS.items():
        st.session_state[key] = getattr(defaults, field)


def plan(bundle: Bundle) -> list[TrainConfig]:
    """One config per (strategy, seed) from the form; raises DataError for a bad strategy."""
    ss = st.session_state
    return [
        TrainConfig.for_bundle(
            bundle, strategy=strategy, seed=seed, epochs=int(ss.train_epochs),
            temperature=float(ss.train_temperature), lam=float(ss.train_lam),
            normalisation=ss.train_normalisation)
        for strategy in ss.train_strategies for seed in range(int(ss.train_seeds))
    ]


def pending(store: RunStore, configs: list[TrainConfig]) -> tuple[list[TrainConfig], int, int]:
    """The configs to start now, how many are training already, and how many are reused.

    A config identical to a queued or running one is never started twice; with reuse on, one
    identical to a finished run is skipped too (training is deterministic per seed).
    """
    training = {r.config_key for r in store.list(status=["queued", "running"])}
    todo = [c for c in configs if config_key(c.to_dict()) not in training]
    n_training = len(configs) - len(todo)
    if st.session_state.train_reuse:
        todo = [c for c in todo if store.find_done(c.to_dict()) is None]
    return todo, n_training, len(configs) - n_training - len(todo)


def describe_work(configs: list[TrainConfig], todo: list[TrainConfig], n_training: int,
                  n_reused: int, bundle: Bundle) -> str:
    """One line: how many runs, how many to train now, and roughly how long they take."""
    n_strategies = len({c.strategy for c in configs})
    seeds = int(st.session_state.train_seeds)
    epochs = int(st.session_state.train_epochs)
    text = (f"**{len(configs)} run{'s' * (len(configs) != 1)}** ({n_strategies} "
            f"strateg{'ies' if n_strategies != 1 else 'y'} × {seeds} seed{'s' * (seeds != 1)}, "
            f"{epochs} epochs each): **{len(todo)} to train**")
    if n_reused:
        text += f", {n_reused} already finished with identical settings (reused)"
    if n_training:
        text += f", {n_training} training right now"
    rate = seconds_per_epoch(str(state.store().workspace), str(bundle.path))
    if todo and rate is not None:
        parallel = min(len(todo), os.cpu_count() or 1)
        seconds = (rate[0] * epochs + STARTUP_S) * len(todo) / parallel
        text += (f". About {_duration(seconds)} on this machine ({parallel} at a time, "
                 f"timed from {rate[1]} earlier runs)")
    return text + "."


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def start(todo: list[TrainConfig]) -> None:
    """Start button handler: one detached process per run; the outcome is shown on rerun."""
    workspace = state.store().workspace
    started: list[str] = []
    for config in todo:
        try:
            started.append(start_job(config, workspace=workspace))
        except (KDCoreError, OSError) as exc:
            st.session_state["train_start_error"] = (
                f"Could not start {config.strategy} seed {config.seed}: {exc}")
            break
    if started:
        st.session_state["train_started"] = len(started)


def render_start_outcome() -> None:
    error = st.session_state.pop("train_start_error", None)
    if error:
        st.error(error, icon=":material/error:")
    started = st.session_state.pop("train_started", 0)
    if started:
        st.success(f"Started {started} run{'s' * (started > 1)}. They keep running if you close "
                   "this tab; follow them below and compare them on **Results**.",
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
        "Strategies", list(STRATEGIES), key="train_strategies", accept_new_options=True,
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
        configs = plan(bundle)
    except KDCoreError as exc:
        state.show_error(exc)
        return
    todo, n_training, n_reused = pending(state.store(), configs)
    st.markdown(describe_work(configs, todo, n_training, n_reused, bundle))
    if len(todo) > MANY_AT_ONCE:
        st.warning(
            f"{len(todo)} training processes will start at once on {os.cpu_count()} CPU cores: "
            "each run then takes longer and uses memory. Fewer seeds or strategies per batch "
            "keep the machine responsive.", icon=":material/warning:")
    if not todo and not st.session_state.get("train_started"):
        st.info("Nothing new to train: every run above has finished (see **Results**) or is "
                "training now. Change the settings, or untick reuse to train them again.",
                icon=":material/info:")
    st.button("Start training", key="train_start", type="primary", disabled=not todo,
              icon=":material/play_arrow:", on_click=start, args=(todo,))
    render_start_outcome()


def render_job(run: Run, epochs: pd.DataFrame, store: RunStore) -> None:
    """One job on one line: what it is, its progress, its latest numbers and Cancel. The same
    elements every refresh, so the Cancel button stays put while the panel updates."""
    with st.container(border=True, key=f"train_job_{run.id}"):
        name, progress, button = st.columns([3, 5, 1.3], vertical_alignment="center")
        name.markdown(f"**{run.strategy}** · seed {run.seed}  \n`{run.id}`")
        fraction = run.fraction or 0.0
        if run.status == "queued":
            waited = (datetime.now(timezone.utc)
                      - datetime.fromisoformat(run.created_at)).total_seconds()
            progress.progress(0.0, text="queued: waiting for its process to start"
                              + (f" ({waited:.0f} s; if it never starts, read "
                                 f"{store.runs_dir / run.id / LOG_FILE})"
                                 if waited > SLOW_START_S else ""))
        else:
            total = int(run.config.get("epochs") or 0)
            current = min(int(epochs["epoch"].iloc[-1]) + 2, total) if len(epochs) else 1
            doing = f"epoch {current}/{total}" if fraction or len(epochs) else "loading the data"
            progress.progress(fraction, text=f"{fraction:.0%} · {doing}")
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
            "duration_s": st.column_config.NumberColumn("Took", format="%.0f s"),
            "error": "Error",
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


@st.fragment(run_every=REFRESH_S)
def render_jobs() -> None:
    """The live panel: refreshes itself every few seconds, reading only the store."""
    store = state.store()
    error = st.session_state.pop("train_cancel_error", None)
    if error:
        st.error(error, icon=":material/error:")
    try:
        active = store.list(status=["queued", "running"])
        active.reverse()  # oldest first: the order they were started
        st.subheader(f"Running now ({len(active)})")
        if not active:
            st.caption("No job is running. Jobs started here or with `kdcore train` show up "
                       "here, and keep running when you close the tab.")
        epochs = {run.id: store.epochs(run.id) for run in active}
        curves = [frame.assign(job=f"{run.strategy} · seed {run.seed}")
                  for run in active if len(frame := epochs[run.id])]
        if curves:
            st.plotly_chart(charts.job_curves(pd.concat(curves, ignore_index=True)),
                            key="train_live_curves")
        for run in active:
            render_job(run, epochs[run.id], store)
        render_recent(store)
    except KDCoreError as exc:
        state.show_error(exc)


st.title("Train students")
st.caption("Each run trains in its own background process and writes to the run store "
           f"({state.store().workspace}).")
render_form()
render_jobs()
