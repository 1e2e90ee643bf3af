"""The kdcore dashboard: a router over the pages in app_pages/.

Run: streamlit run dashboard/app.py (from any folder).
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # so pages can `from dashboard import charts, state` from any cwd
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

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
