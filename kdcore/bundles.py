"""Kept import path: bundles and ``load_dataset`` live in :mod:`kdcore.data`."""

from kdcore.data.bundles import *  # noqa: F403
from kdcore.data.bundles import Bundle, load_bundle, load_dataset  # noqa: F401
