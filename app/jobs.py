"""Indexing a folder from the UI: a background thread runs the indexer while the page polls its progress.

The indexer reports progress through its ``on_progress`` hook after every batch; the page reads the
latest count. The job reuses the app's loaded encoder when the collection's model is already loaded.
One job runs per database at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from clipdex.exceptions import ClipdexError
from clipdex.indexer.reader import read_source
from clipdex.indexer.runner import IndexSettings, run_index

logger = logging.getLogger(__name__)


@dataclass
class IndexJob:
    """One index run: its settings, the folder's image count, and when done its summary or its error."""

    settings: IndexSettings
    source: str  # as the store records it, to count this folder's rows
    total: int  # images in the folder
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    summary: dict | None = None
    error: str | None = None
    handled: int = 0
    encoder: object = None  # an already loaded encoder for settings.model, or None to load one

    @property
    def running(self) -> bool:
        return self.finished is None

    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def done(self) -> int:
        """Files of the folder handled so far (unchanged ones included)."""
        return self.handled

    def on_progress(self, done: int, total: int) -> None:
        """The indexer's progress hook."""
        self.handled, self.total = done, total


class IndexJobs:
    """The jobs of one process, by database folder."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, IndexJob] = {}

    def latest(self, db: str) -> IndexJob | None:
        """The running or last finished job of ``db``."""
        return self._jobs.get(str(Path(db).resolve()))

    def start(self, settings: IndexSettings, *, encoder=None) -> IndexJob:
        """Start indexing ``settings.source`` in a background thread; refused while ``settings.db`` has one."""
        key = str(Path(settings.db).resolve())
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.running:
                raise ClipdexError(f"an index run into {job.settings.collection!r} is still going on; wait for it")
            listing = read_source(settings.source)
            job = IndexJob(settings, listing.source, len(listing.items) + len(listing.missing), encoder=encoder)
            self._jobs[key] = job
        threading.Thread(target=self._run, args=(job,), name=f"clipdex-index-{settings.collection}",
                         daemon=True).start()
        return job

    @staticmethod
    def _run(job: IndexJob) -> None:
        try:
            job.summary = run_index(job.settings, progress=False, on_progress=job.on_progress, encoder=job.encoder)
        except ClipdexError as e:
            job.error = str(e)
        except Exception as e:  # noqa: BLE001 - a failed run is reported on the page, not lost in a thread
            logger.exception("index run into %s failed", job.settings.collection)
            job.error = f"{type(e).__name__}: {e}"
        finally:
            job.finished = time.monotonic()
