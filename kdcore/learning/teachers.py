"""The teacher as a model: rebuilt from a dataset's spec and weights (data/ knows no torch)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from torch import nn

from kdcore.data.dataset import Dataset
from kdcore.errors import DataError
from kdcore.learning.models import build_model, count_parameters, load_weights

FIX = ("make teacher.architecture in the manifest match the weights, or save them with "
       "torch.save(teacher.state_dict(), path)")


def check_teacher(dataset: Dataset) -> int | None:
    """The teacher's parameter count, once its weights are known to fit its architecture; None
    when the dataset has only the teacher's outputs (a tabular file).

    Counted from the spec and checked against the file without building the model, so a spec
    of any size costs nothing, and read without unpickling code. A DataError otherwise.
    """
    weights, spec = dataset.teacher_weights, dataset.teacher_spec
    if weights is None or spec is None:
        return None
    try:
        stat = Path(weights).stat()
    except OSError as exc:
        raise DataError(f"{weights}: cannot read the teacher's weights ({exc.strerror}); "
                        "put them in the bundle folder") from None
    return _checked(str(weights), (stat.st_mtime_ns, stat.st_size),
                    json.dumps(spec, sort_keys=True))


@lru_cache(maxsize=16)
def _checked(file: str, stamp: tuple[int, int], spec: str) -> int:
    """:func:`check_teacher` of one version of a file (``stamp``: its mtime and size), read once
    however many runs are planned on it."""
    skeleton = build_model(json.loads(spec), meta=True)
    load_weights(skeleton, Path(file), fix=FIX)
    return count_parameters(skeleton)


def load_teacher(dataset: Dataset) -> nn.Module | None:
    """The teacher in eval mode, weights loaded without unpickling code; None when the dataset
    has only the teacher's outputs (a tabular file)."""
    if check_teacher(dataset) is None:  # the weights fit the spec before the model is built
        return None
    model = build_model(dataset.teacher_spec)
    return load_weights(model, dataset.teacher_weights, fix=FIX).eval()
