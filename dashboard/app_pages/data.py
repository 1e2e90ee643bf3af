"""Data: the bundles the app knows, and uploads of your own teacher's predictions."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from kdcore.analysis.analyzer import SPLIT_MEANING
from kdcore.data.tables import LOGIT_PREFIX, PROB_PREFIX
from kdcore.errors import KDCoreError
from kdcore_app import state

st.title("Data")
st.caption("Analyse the bundled sample, a dataset bundle, or your own teacher's predictions. "
           "An accepted upload becomes a data source on the Teacher bias page.")

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
            c4.metric("Splits", ", ".join(f"{s} {n:,}" for s, n in counts.items())
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
