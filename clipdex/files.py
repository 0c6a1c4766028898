"""Files: the one atomic writer every artefact (checkpoints, FAISS sidecars, reports) uses, the cleanup of
what a killed writer leaves, and the one content hash (of indexed images and of the store's own files)."""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path


def content_hash(data: bytes) -> str:
    """blake2b-128 of some bytes, as hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_file(path: str | Path) -> str:
    """The :func:`content_hash` of the file at ``path``, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp$")  # what atomic_write names its temporary files


def atomic_write(path: str | Path, write: Callable[[Path], object], *, mode: int | None = 0o644) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file sits in the same folder (so the rename is atomic) under a name unique to this call,
    so two writers of the same file never share one; it is removed if ``write`` fails. The parent folder is
    created. ``mode`` sets the file's permissions before the rename (``None`` leaves them as written).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: someone else's process, alive
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_temp_files(folder: str | Path, *, older_than: float = 3600.0) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left in ``folder`` when its process was killed: those
    whose writer (the pid in the name) is no longer running, or that are older than ``older_than`` seconds
    (a pid reused since, or a writer on another host). Returns the files removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now = time.time()
    for f in entries:
        m = _TEMP_NAME.match(f.name)
        if not m:
            continue
        try:
            old = now - f.stat().st_mtime > older_than
            if old or not _alive(int(m.group(1))):
                f.unlink()
                removed.append(f)
        except OSError:
            continue  # gone already, or not ours to remove
    return removed
