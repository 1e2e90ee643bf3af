"""Kept import path: the bias decomposition lives in :mod:`kdcore.analysis.bias`."""

from kdcore.analysis.bias import *  # noqa: F403
from kdcore.analysis.bias import BiasAccumulator, BiasReport, decompose  # noqa: F401
