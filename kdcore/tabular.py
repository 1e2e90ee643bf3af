"""Kept import path: tabular files live in :mod:`kdcore.data.tabular`."""

from kdcore.data.tabular import *  # noqa: F403
from kdcore.data.tabular import TabularDataset, load_tabular  # noqa: F401
