"""The kdcore dashboard: a router over the pages in app_pages/.

Installed as the package ``kdcore_app`` (the repository's dashboard/ folder), so pages import
``from kdcore_app import ...`` from any folder. Run: ``kdcore dashboard``.
"""

from pathlib import Path

import streamlit as st

st.set_page_config(page_title="kdcore", layout="wide")

_PAGES = Path(__file__).resolve().parent / "app_pages"
page = st.navigation([
    st.Page(_PAGES / "overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page(_PAGES / "teacher_bias.py", title="Teacher bias", icon=":material/troubleshoot:"),
    st.Page(_PAGES / "train.py", title="Train", icon=":material/model_training:"),
    st.Page(_PAGES / "results.py", title="Results", icon=":material/leaderboard:"),
    st.Page(_PAGES / "roi.py", title="ROI", icon=":material/savings:"),
    st.Page(_PAGES / "data.py", title="Data", icon=":material/dataset:"),
])
page.run()
