"""Indexing a folder from the UI: a background thread runs the indexer while the page polls its progress.

The app never hands the indexer the folder itself (the indexer follows links wherever they lead): it lists
the folder, keeps the files whose real path lies under the app's index roots, and hands the indexer that
list as a manifest (``<db>/_app_listings/``, beside a sidecar naming the folder and the refused files).
The indexer reports progress through its ``on_progress`` hook after every batch; the page reads the
latest count. The job reuses the app's loaded encoder when the collection's model is already loaded.
One job runs per database at a time (the app), or per collection (``clipdex serve``: ``IndexJobs(per="collection")``).
A job asked to stop (:meth:`IndexJobs.stop_all`, at a server's shutdown) ends after the batch it is on and
commits every batch it embedded; the next run indexes the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from clipdex.app.inputs import confine_listing, resolved_roots
from clipdex.exceptions import ClipdexError
from clipdex.files import atomic_write
from clipdex.indexer.reader import SourceItem, read_folder
from clipdex.indexer.runner import IndexSettings, IndexStopped, run_index

LISTINGS = "_app_listings"  # under the database folder: the manifests of the folders indexed from the app

logger = logging.getLogger(__name__)


class JobRunningError(ClipdexError):
    """An index run was asked for while another one into the same collection (or database) is going on."""


@dataclass
class IndexJob:
    """One index run: its settings, the folder's image count, and when done its summary or its error."""

    settings: IndexSettings  # its source: the folder's listing (a manifest)
    folder: str  # the folder the user named
    total: int  # images in the folder the indexer may open
    refused: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): links out, unlistable files
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    summary: dict | None = None
    error: str | None = None
    handled: int = 0
    encoder: object = None  # an already loaded encoder for settings.model, or None to load one
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    stop: threading.Event = field(default_factory=threading.Event, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.finished is None

    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def done(self) -> int:
        """Files of the folder handled so far (unchanged ones included)."""
        return self.handled

    def on_progress(self, done: int, total: int) -> None:
        """The indexer's progress hook; raises :class:`~clipdex.indexer.runner.IndexStopped` once the job was
        asked to stop (the indexer then commits what it embedded)."""
        self.handled, self.total = done, total
        if self.stop.is_set():
            raise IndexStopped(f"the index run into {self.settings.collection!r} was stopped after {done} of "
                               f"{total} files (the server shut down); they are committed, run it again for the "
                               "rest")

    def as_dict(self) -> dict:
        """The job as JSON: id, collection, folder, running, done, total, seconds, refused, summary, error."""
        return {"id": self.id, "collection": self.settings.collection, "folder": self.folder,
                "running": self.running, "done": self.done(), "total": self.total,
                "seconds": round(self.seconds(), 3),
                "refused": [{"path": p, "reason": r} for p, r in self.refused],
                "summary": self.summary, "error": self.error}


class IndexJobs:
    """The jobs of one process: one running at a time ``per`` database folder (``"database"``) or collection
    (``"collection"``); every job stays findable by its id."""

    def __init__(self, *, per: str = "database") -> None:
        if per not in ("database", "collection"):
            raise ValueError(f"IndexJobs(per=...) is 'database' or 'collection', not {per!r}")
        self.per = per
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], IndexJob] = {}  # (db, collection or "") -> its running or last job
        self._by_id: dict[str, IndexJob] = {}

    def _key(self, db: str, collection: str) -> tuple[str, str]:
        return str(Path(db).resolve()), collection if self.per == "collection" else ""

    def latest(self, db: str, collection: str | None = None) -> IndexJob | None:
        """The running or last finished job of ``db`` (of ``collection`` there, when jobs are per collection)."""
        if self.per == "collection" and collection is None:
            jobs = [j for (d, _), j in self._jobs.items() if d == str(Path(db).resolve())]
            return max(jobs, key=lambda j: j.started) if jobs else None
        return self._jobs.get(self._key(db, collection or ""))

    def get(self, job_id: str) -> IndexJob | None:
        """The job with this id, running or finished (None: no such job in this process)."""
        return self._by_id.get(job_id)

    def stop_all(self, *, timeout: float) -> list[IndexJob]:
        """Ask every running job to stop after its batch and wait up to ``timeout`` seconds in all; returns the
        jobs still running then."""
        running = [j for j in self._by_id.values() if j.running]
        for j in running:
            j.stop.set()
        deadline = time.monotonic() + timeout
        for j in running:
            if j.thread is not None:
                j.thread.join(max(0.0, deadline - time.monotonic()))
        return [j for j in running if j.running]

    def start(self, settings: IndexSettings, *, roots: tuple[str, ...], encoder=None) -> IndexJob:
        """Start indexing the folder ``settings.source`` (checked to lie under ``roots``) in a background
        thread, confined to the files whose real path lies under ``roots``; refused while ``settings.db``
        has a run going on."""
        key = self._key(settings.db, settings.collection)
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.running:
                raise JobRunningError(f"an index run into {job.settings.collection!r} is still going on (job "
                                      f"{job.id}); wait for it")
            folder = Path(settings.source)
            items, refused = confine_listing(read_folder(folder), roots=resolved_roots(roots))
            manifest = write_listing(folder, items, refused, db=settings.db, collection=settings.collection)
            job = IndexJob(replace(settings, source=manifest, follow_links=False), str(folder), len(items), refused,
                           encoder=encoder)
            self._jobs[key] = self._by_id[job.id] = job
            job.thread = threading.Thread(target=self._run, args=(job,), name=f"clipdex-index-{settings.collection}",
                                          daemon=True)
        job.thread.start()
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


def listing_path(folder: str | Path, *, db: str, collection: str) -> Path:
    """Where the listing of ``folder`` for ``collection`` is kept: one per (folder, collection), so that a
    re-index of the folder is recorded as the same source and only changes what changed."""
    key = hashlib.sha256(f"{collection}\0{folder}".encode()).hexdigest()[:20]
    return Path(db).resolve() / LISTINGS / f"{key}.parquet"


def write_listing(folder: Path, items: list[SourceItem], refused: list[tuple[str, str]], *, db: str,
                  collection: str) -> str:
    """Write the manifest of ``items`` (id and real path) and its sidecar (the folder, the refused files);
    returns the manifest's path, the source the store records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = listing_path(folder, db=db, collection=collection)
    table = pa.table({"id": pa.array([i.id for i in items], pa.string()),
                      "path": pa.array([i.path for i in items], pa.string())})
    sidecar = {"folder": str(folder), "refused": [{"path": p, "reason": r} for p, r in refused]}
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(sidecar, indent=1)))
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return str(path)


def listing_sidecar(source: str) -> dict | None:
    """The sidecar of a source that is an app listing (``folder`` and ``refused``); None for any other."""
    path = Path(source)
    if path.parent.name != LISTINGS or path.suffix != ".parquet":
        return None
    try:
        return json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
