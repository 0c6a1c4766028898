"""One writer per collection: a lock file that the kernel releases the moment its holder dies.

``DB/_locks/<collection>.lock`` is held with ``flock`` by the process that writes the collection (an index
run, from the CLI or the app) for the whole run. The file also says who holds it (pid, host, since when,
what command), so a second writer is told whom it is waiting for. A lock whose holder was killed is not
stale: the kernel dropped it with the process, and the next writer takes it at once and overwrites the
holder's note. Readers (search, ask, check) never lock: LanceDB's commits are atomic and FAISS files are
replaced by rename.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from clipdex.exceptions import StoreError

LOCKS_DIR = "_locks"


class CollectionBusyError(StoreError):
    """Another process is writing the collection; the message names it."""


class ReadOnlyDatabaseError(StoreError):
    """The database folder cannot be written (a read-only mount, or no permission)."""


def lock_path(db_dir: str | Path, collection: str) -> Path:
    """Where the writer lock of ``collection`` lives."""
    return Path(db_dir) / LOCKS_DIR / f"{collection}.lock"


def _holder_note() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}


def read_holder(path: Path) -> dict | None:
    """The note the current holder wrote (None if there is none or it cannot be read)."""
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def describe_holder(note: dict | None) -> str:
    """'pid 123 on host since 2026-12-02T01:02:03+00:00 (clipdex index ...)', or 'another process'."""
    if not note:
        return "another process"
    return f"pid {note.get('pid')} on {note.get('host')} since {note.get('since')} ({note.get('command')})"


def _open_lock_file(path: Path, db_dir: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise ReadOnlyDatabaseError(f"the database folder {db_dir} is read-only ({e.strerror}): nothing can be "
                                        "indexed into it. Search still works on it; to index, use a writable --db")
        raise StoreError(f"cannot create the writer lock {path}: {e}") from e


@contextmanager
def writer_lock(db_dir: str | Path, collection: str, *, wait: float = 0.0,
                poll: float = 0.2) -> Iterator[Path]:
    """Hold the writer lock of ``collection`` for the ``with`` block; yields the lock file's path.

    If another process holds it: wait up to ``wait`` seconds for it (0: not at all), then raise
    :class:`CollectionBusyError` naming the holder. A read-only database raises
    :class:`ReadOnlyDatabaseError`."""
    db_dir = Path(db_dir)
    path = lock_path(db_dir, collection)
    fd = _open_lock_file(path, db_dir)
    try:
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    waited = f" after waiting {wait:g} s" if wait > 0 else ""
                    raise CollectionBusyError(
                        f"collection {collection!r} in {db_dir} is being written by {describe_holder(read_holder(path))}"
                        f"{waited}. One writer at a time: wait for it to finish, or pass --wait SECONDS to queue "
                        "behind it") from None
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_note()).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # released: no note left to mislead a reader of the file
    finally:
        os.close(fd)  # closing the descriptor releases the flock
