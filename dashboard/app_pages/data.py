"""Data: the bundles the app knows, image folders with their teacher, and uploads of your own
teacher's predictions."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import streamlit as st

from kdcore.analysis.analyzer import SPLIT_MEANING
from kdcore.data.images import ImageSource
from kdcore.data.tables import LOGIT_PREFIX, PROB_PREFIX
from kdcore.errors import KDCoreError
from kdcore.learning.predict import DEFAULT_BATCH_SIZE, NORMALIZE_PRESETS
from kdcore.store import tasks
from kdcore_app import state

TASKS = "data_image_tasks"  # session key: task key -> (Task, what it predicts)
N_PREVIEW = 8
KINDS = {"folder": "image folder", "cifar": "CIFAR folder"}
DEFAULT_ARCH = "resnet32x4"  # the paper's CIFAR-100 teacher
PROGRESS = re.compile(r"(\d+)/(\d+)")  # "predicting: 45%|...| 450/1000 [...]"


def show_image_source(source: ImageSource) -> None:
    """What the folder holds: images per split, classes, image size, a few images."""
    cols = st.columns(1 + len(source.splits))
    cols[0].metric("Classes", len(source.class_names))
    for col, split in zip(cols[1:], source.splits, strict=True):
        col.metric(f"{split} images", f"{source.n(split):,}", help=SPLIT_MEANING[split])
    shape = source.image_shape
    size = (f"{shape[1]}x{shape[2]} pixels, {'grey' if shape[0] == 1 else 'colour'}"
            if shape else "mixed sizes: set an image size below, the teacher needs one")
    skipped = getattr(source, "skipped", [])
    st.caption(f"Classes: {', '.join(source.class_names[:20])}"
               + ("…" if len(source.class_names) > 20 else "") + f" · images {size} · "
               f"{KINDS.get(source.kind, source.kind)} {source.root}"
               + (f" · {len(skipped):,} files that are not images skipped" if skipped else ""))
    split = source.splits[0]
    ids, labels = source.sample_ids(split), source.labels(split)
    if labels is not None:  # one image of each class first
        first = np.unique(labels, return_index=True)[1]
        ids = np.concatenate([ids[first], np.delete(ids, first)])
    ids = ids[:N_PREVIEW]
    for col, sample_id in zip(st.columns(N_PREVIEW), ids, strict=False):
        col.image(state.thumbnail(str(source.root), str(sample_id)) or state.missing_thumbnail(),
                  caption=str(sample_id), width="stretch")


def teacher_inputs() -> dict:
    """The teacher and its preprocessing, as start_predict's keyword arguments."""
    by_file = st.radio("Teacher", ["zoo", "file"], horizontal=True, key="data_images_teacher",
                       format_func={"zoo": "kdcore architecture + weights",
                                    "file": "model file (TorchScript, torch.export, ONNX)"}.get)
    if by_file == "zoo":
        t1, t2 = st.columns([1, 2])
        names = tasks.IMAGE_ARCHITECTURES
        chosen = {"model": t1.selectbox("Architecture", names, key="data_images_arch",
                                        index=names.index(DEFAULT_ARCH)
                                        if DEFAULT_ARCH in names else 0),
                  "weights": t2.text_input("Weights file on the server (.pt state dict or "
                                           ".safetensors)", key="data_images_weights")}
    else:
        chosen = {"model_file": st.text_input(
            "Model file on the server (.ts, .pt2 or .onnx)", key="data_images_model_file",
            help="Program and ONNX files are code: loading one runs what its author wrote, so "
                 "load only files from people you trust.")}
    p1, p2, p3 = st.columns(3)
    chosen["normalize"] = p1.selectbox(
        "Normalisation", list(NORMALIZE_PRESETS), key="data_images_normalize",
        help="The mean/std preset the teacher was trained with (pixels in [0, 1] first).")
    chosen["image_size"] = p2.text_input(
        "Image size (H or H,W)", key="data_images_size", placeholder="as stored",
        help="Resize every image to this size; needed when the images' sizes differ.")
    chosen["batch_size"] = p3.number_input("Batch size", 1, 4096, DEFAULT_BATCH_SIZE,
                                           key="data_images_batch")
    return chosen


def show_task(task: tasks.Task, what: str) -> bool:
    """One prediction task's state; True while it runs."""
    status = tasks.task_status(task)
    if status.state == "running":
        found = PROGRESS.findall(status.message)
        done, total = (int(v) for v in found[-1]) if found else (0, 0)
        st.progress(min(done / total, 1.0) if total else 0.0,
                    text=f"Predicting {what}: " + (f"{done:,} of {total:,} images"
                                                    if total else "starting")
                    + f" ({status.seconds:.0f} s)")
        return True
    if status.state == "done":
        st.success(f"{what}: **{state.prediction_name(task.output)}** is now a data source on "
                   "the Teacher bias page, with the images in its drill-down.",
                   icon=":material/check_circle:")
    else:
        st.error(f"{what} failed: {status.message}. Fix it and press Predict again (the log: "
                 f"{task.log}).", icon=":material/error:")
    return False


def show_tasks() -> None:
    """The session's prediction tasks, polled every 2 s while one runs."""
    running = [show_task(task, what) for task, what in st.session_state.get(TASKS, {}).values()]
    if not any(running) and st.session_state.pop("data_images_polling", False):
        st.rerun(scope="app")  # stop polling


st.title("Data")
st.caption("Analyse the bundled sample, a dataset bundle, an image folder with its teacher, or "
           "your own teacher's predictions. Each becomes a data source on the Teacher bias "
           "page.")

# ---------------------------------------------------------------- bundles
st.subheader("Dataset bundles")
bundles = state.bundle_choices()
name = st.selectbox("Bundle", list(bundles), key="data_bundle",
                    help=f"The bundled sample, plus any bundle folder under "
                         f"{state.workspace() / 'bundles'}.")
try:
    bundle = state.source_bundle(name)
    manifest = bundle.manifest
    b1, b2, b3, b4 = st.columns(4)
    b1.metric("Classes", bundle.n_classes)
    for col, split in zip((b2, b3, b4), ("train", "unlabelled", "test"), strict=True):
        if split in bundle.splits:
            col.metric(f"{split} samples", f"{len(bundle.x(split)):,}", help=SPLIT_MEANING[split])
    if manifest.get("description"):
        st.write(manifest["description"])
    st.caption(f"Classes: {', '.join(bundle.class_names)} · inputs "
               f"{'x'.join(map(str, bundle.image_shape or manifest['input_shape']))} · "
               f"folder {bundle.path}")
except (KDCoreError, OSError, KeyError) as exc:
    state.show_error(exc, "This bundle cannot be read: ")

# ---------------------------------------------------------------- image folder
st.subheader("Image folder")
st.caption("A folder on the server, where kdcore runs: train/<class>/… images, optionally "
           "test/<class>/… and unlabelled/…, or a CIFAR-10/100 python-version folder. Give its "
           "path: uploading thousands of images through the browser is not practical. The "
           "teacher predicts every image in a background process; the table it writes is kept "
           f"in {state.workspace() / tasks.PREDICTIONS_DIR}.")
folder = st.text_input("Folder on the server", key="data_images_path",
                       placeholder="/data/my-images")
source = None
if folder.strip():
    try:
        source = state.image_source(folder)
    except (KDCoreError, OSError) as exc:
        state.show_error(exc, "Not an image folder: ")
if source is not None:
    show_image_source(source)
    teacher = teacher_inputs()
    if st.button("Predict", type="primary", key="data_images_predict",
                 icon=":material/play_arrow:"):
        try:
            task = tasks.start_predict(source.root, workspace=state.workspace(), **teacher)
        except (KDCoreError, OSError) as exc:
            state.show_error(exc, "Cannot predict: ")
        else:
            name = teacher.get("model_file") or f"{teacher['model']} ({teacher['weights']})"
            st.session_state.setdefault(TASKS, {})[task.key] = (
                task, f"{source.root.name} with {name.strip()}")
if st.session_state.get(TASKS):
    polling = any(tasks.task_status(t).state == "running"
                  for t, _ in st.session_state[TASKS].values())
    st.session_state["data_images_polling"] = polling
    st.fragment(show_tasks, run_every=2 if polling else None)()

# ---------------------------------------------------------------- upload
st.subheader("Upload a prediction table")
try:
    limit_mb = state.max_upload_bytes() / 1024**2
except KDCoreError as exc:
    state.show_error(exc, "Uploads are off: ")
    upload = None
else:
    upload = st.file_uploader(
        f"CSV or Parquet, one row per sample (up to {limit_mb:,.0f} MB)",
        type=["csv", "parquet"], key="data_upload",
        help="Set KDCORE_MAX_UPLOAD_MB to change the limit (Streamlit's own "
             "server.maxUploadSize also applies).")
if upload is not None:
    seen = st.session_state.setdefault("data_upload_seen", {})
    file_key = getattr(upload, "file_id", None) or f"{upload.name}:{upload.size}"
    if file_key not in seen:  # validate each uploaded file once, not on every rerun
        with st.spinner(f"Checking {upload.name}…"):
            try:
                table = state.validate_upload(upload.name, upload.getvalue())
                seen[file_key] = {"ok": state.keep_upload(upload.name, table, file_key)}
            except KDCoreError as exc:
                seen[file_key] = {"error": str(exc)}
    outcome = seen[file_key]
    if "error" in outcome:
        st.error(f"{upload.name} was not accepted. {outcome['error']}", icon=":material/error:")
        st.caption("Fix the file and upload it again; the expected columns are listed below.")
    else:
        st.success(f"Accepted: **{outcome['ok']}** is now a data source on the Teacher bias "
                   "page (sidebar).", icon=":material/check_circle:")

uploads = st.session_state.get(state.UPLOADS, {})
if uploads:
    st.markdown("**Accepted tables** (kept for this browser session)")
    for label, table in list(uploads.items()):
        with st.container(border=True):
            c1, c2, c3, c4, c5 = st.columns([3, 1, 1, 2, 1])
            c1.markdown(f"**{label}**")
            c2.metric("Rows", f"{table.n_samples:,}")
            c3.metric("Classes", table.n_classes)
            counts = (pd.Series(table.split).value_counts().reindex(table.splits)
                      if table.split is not None else None)
            # Not a metric: its value is cut off at the column's width ("train 30, unl…");
            # markdown wraps, so every split's count stays readable.
            c4.caption("Splits")
            c4.markdown("  \n".join(f"**{s}** {n:,}" for s, n in counts.items())
                        if counts is not None else "none (all rows analysed together)")
            if c5.button("Remove", key=f"data_remove_{label}"):
                state.forget_upload(label)
                st.rerun()
            prefix = LOGIT_PREFIX if table.kind == "logits" else PROB_PREFIX
            head = pd.DataFrame(table.outputs[:5], columns=[prefix + c for c in table.class_names])
            head.insert(0, "label", [table.class_names[i] if i >= 0 else "" for i in
                                     table.labels[:5]])
            if table.split is not None:
                head["split"] = table.split[:5]
            n_labelled = int((table.labels >= 0).sum())
            st.caption(f"Teacher outputs as {table.kind}; {n_labelled:,} labelled rows; "
                       f"classes {', '.join(table.class_names[:20])}"
                       + ("…" if table.n_classes > 20 else ""))
            st.dataframe(head, hide_index=True, width="stretch")

# ---------------------------------------------------------------- contract
st.subheader("What a prediction table looks like")
CONTRACT = [
    ("`label`", "yes", "the true class, as a class name or index `0..K-1`; empty only on "
     "`unlabelled` rows"),
    (f"`{LOGIT_PREFIX}<class>` or `{PROB_PREFIX}<class>`", "yes, one per class",
     "the teacher's raw scores (logits) or its probabilities; one kind per file; the column "
     "order is the class order"),
    ("`split`", "no", "; ".join(f"`{s}`: {m}" for s, m in SPLIT_MEANING.items())),
    ("`sample_id`", "no", "a unique id per row, shown next to each sample"),
]
st.markdown("One row per sample, with these columns:\n\n| column | required | what it holds |\n"
            "|---|---|---|\n" + "\n".join(f"| {c} | {r} | {w} |" for c, r, w in CONTRACT)
            + "\n\nAny other column is rejected with a message that names it and the fix.")
st.download_button("Download an example CSV (the bundled sample's held-out split)",
                   state.example_csv("test"), file_name="example_predictions.csv",
                   mime="text/csv", key="data_example", icon=":material/download:")
