"""Where kdcore keeps its state: ``--workspace``, else ``$KDCORE_HOME``, else ``./.kdcore``.

The run store, the job queue, label overrides, the CLI and the dashboard all ask this one
function, so a run started anywhere is seen everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdcore.errors import DataError

ENV_HOME = "KDCORE_HOME"
DEFAULT_DIR = ".kdcore"


def resolve_workspace(workspace: str | Path | None = None, *, create: bool = True) -> Path:
    """The workspace folder, absolute: ``workspace`` if given, else ``$KDCORE_HOME``, else
    ``./.kdcore``.

    The folder is created unless ``create`` is false (readers that must not leave an empty
    workspace behind, such as the label overrides).
    """
    if workspace is None or str(workspace).strip() == "":
        workspace = os.environ.get(ENV_HOME, "").strip() or Path.cwd() / DEFAULT_DIR
    path = Path(workspace).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"workspace {path} is a file, not a folder; pass --workspace or set "
                        f"{ENV_HOME} to a folder")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot create workspace {path} ({exc.strerror or exc}); pass "
                            f"--workspace or set {ENV_HOME} to a writable folder") from exc
    return path.resolve()
