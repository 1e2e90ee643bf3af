"""Kept import path: the losses live in :mod:`kdcore.learning.losses`."""

from kdcore.learning.losses import *  # noqa: F403
from kdcore.learning.losses import (  # noqa: F401
    dist_loss,
    dkd_loss,
    kd_loss,
    ls_kd_loss,
    parse_strategy,
    rld_loss,
    strategy_loss,
)
