"""The teacher as a model: rebuilt from a dataset's spec and weights (data/ knows no torch)."""

from __future__ import annotations

import torch
from torch import nn

from kdcore.data.dataset import Dataset
from kdcore.errors import DataError
from kdcore.learning.models import build_model


def load_teacher(dataset: Dataset) -> nn.Module | None:
    """The teacher in eval mode, weights loaded without unpickling code; None when the dataset
    has only the teacher's outputs (a tabular file)."""
    weights = dataset.teacher_weights
    if weights is None or dataset.teacher_spec is None:
        return None
    model = build_model(dataset.teacher_spec)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError, KeyError) as exc:
        raise DataError(
            f"{weights}: cannot load teacher weights ({exc}); rebuild the bundle") from None
    return model.eval()
