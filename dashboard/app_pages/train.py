"""Train: queue students as background jobs and watch them live.

The form is planned by ``compare.plan``; ``jobs.queue_runs`` leaves out runs identical to a
finished or an in-flight one and queues the rest, which train a few at a time (one per core),
each in its own detached process (:mod:`kdcore.store.jobs`). Jobs keep going when the tab
closes or the app restarts, and write their progress to the run store, which is all this page
reads; so jobs started from the CLI show up here too.
"""

from __future__ import annotations

import statistics
from datetime import datetime

import pandas as pd
import streamlit as st

from kdcore.data.bundles import Bundle
from kdcore.errors import KDCoreError
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
from kdcore.value import figures
from kdcore.value.compare import plan
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


def describe_work(configs: list[TrainConfig], work: Work, bundle: Bundle) -> str:
    """One line: how many runs, how many to train now, and roughly how long they take."""
    n_strategies = len({c.strategy for c in configs})
    seeds = int(st.session_state.train_seeds)
    epochs = int(st.session_state.train_epochs)
    text = (f"**{len(configs)} run{'s' * (len(configs) != 1)}** ({n_strategies} "
            f"strateg{'ies' if n_strategies != 1 else 'y'} × {seeds} seed{'s' * (seeds != 1)}, "
            f"{epochs} epochs each): **{len(work.todo)} to train**")
    if work.reused:
        text += f", {work.reused} already finished with identical settings (reused)"
    if work.in_flight:
        text += f", {work.in_flight} queued or training right now"
    rate = seconds_per_epoch(str(state.store().workspace), str(bundle.path))
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
        work = plan_work(state.store(), configs, reuse=st.session_state.train_reuse)
    except KDCoreError as exc:
        state.show_error(exc)
        return
    st.markdown(describe_work(configs, work, bundle))
    if not work.todo and not st.session_state.get("train_started"):
        st.info("Nothing new to train: every run above has finished (see **Results**) or is "
                "queued or training now. Change the settings, or untick reuse to train them "
                "again.", icon=":material/info:")
    st.button("Start training", key="train_start", type="primary", disabled=not work.todo,
              icon=":material/play_arrow:", on_click=start, args=(configs,))
    render_start_outcome()


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
render_form()
render_jobs()
