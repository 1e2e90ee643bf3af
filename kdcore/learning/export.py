"""A run's trained weights written out for use elsewhere (``kdcore export``).

Two formats: a torch state dict (``torch.save``, loads with ``torch.load(weights_only=True)``)
and safetensors (no pickle at all, loads in any framework with a safetensors reader). Either
one loads back into kdcore as ``--model ARCH --weights FILE``. The file is written whole or not
at all: into a temporary file beside ``out``, then renamed over it, so an existing file is
replaced (as ``--out`` promises) but never left half-written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import torch

from kdcore.errors import DataError
from kdcore.learning.models import read_weights

SUFFIXES = {"state_dict": (".pt", ".pth"), "safetensors": (".safetensors",)}


def export_weights(state_dict_file: Path, out: Path,
                   fmt: Literal["state_dict", "safetensors"]) -> Path:
    """Write the state dict in ``state_dict_file`` (a run's ``student.pt``) to ``out`` in
    ``fmt``; returns ``out``. A DataError for an unknown format, a suffix that the loader would
    not read as that format, a missing folder, or a file that is not a state dict."""
    if fmt not in SUFFIXES:
        raise DataError(f"unknown export format {fmt!r}; use one of {sorted(SUFFIXES)}")
    out = Path(out)
    if out.suffix.lower() not in SUFFIXES[fmt]:
        raise DataError(f"{out}: a {fmt} file is named *{' or *'.join(SUFFIXES[fmt])}, so "
                        f"kdcore and other tools read it as {fmt}; give --out "
                        f"{out.with_suffix(SUFFIXES[fmt][0]).name}")
    if not out.parent.is_dir():
        raise DataError(f"{out}: the folder {out.parent} does not exist; create it or give "
                        "another --out")
    if out.is_dir():
        raise DataError(f"{out}: is a folder; give --out a file name")
    state = read_weights(state_dict_file, fix="train the run again to export it")
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DataError(f"{state_dict_file}: not a state dict of tensors; train the run again "
                        "to export it")
    # Own, contiguous CPU copies: safetensors refuses views and tensors sharing memory.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    handle, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(handle)
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
