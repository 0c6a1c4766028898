"""Writing files safely: the one atomic writer every artefact (checkpoints, FAISS sidecars, reports) uses."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object], *, mode: int | None = 0o644) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file sits in the same folder (so the rename is atomic) under a name unique to this call,
    so two writers of the same file never share one; it is removed if ``write`` fails. The parent folder is
    created. ``mode`` sets the file's permissions before the rename (``None`` leaves them as written).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
