"""Kept import path: the losses live in :mod:`kdcore.learning.losses`."""

from kdcore.learning.losses import *  # noqa: F403
from kdcore.learning.losses import dkd_loss, kd_loss, parse_strategy, strategy_loss  # noqa: F401
