"""Indexing a folder from the UI: a background thread runs the indexer while the page polls its progress.

The app never hands the indexer the folder itself (the indexer follows links wherever they lead): it lists
the folder, keeps the files whose real path lies under the app's index roots, and hands the indexer that
list as a manifest (``<db>/_app_listings/``, beside a sidecar naming the folder and the refused files).
The indexer reports progress through its ``on_progress`` hook after every batch; the page reads the
latest count. The job reuses the app's loaded encoder when the collection's model is already loaded.
One job runs per database at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from clipdex.app.inputs import confine_listing, resolved_roots
from clipdex.exceptions import ClipdexError
from clipdex.files import atomic_write
from clipdex.indexer.reader import SourceItem, read_folder
from clipdex.indexer.runner import IndexSettings, run_index

LISTINGS = "_app_listings"  # under the database folder: the manifests of the folders indexed from the app

logger = logging.getLogger(__name__)


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

    def start(self, settings: IndexSettings, *, roots: tuple[str, ...], encoder=None) -> IndexJob:
        """Start indexing the folder ``settings.source`` (checked to lie under ``roots``) in a background
        thread, confined to the files whose real path lies under ``roots``; refused while ``settings.db``
        has a run going on."""
        key = str(Path(settings.db).resolve())
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.running:
                raise ClipdexError(f"an index run into {job.settings.collection!r} is still going on; wait for it")
            folder = Path(settings.source)
            items, refused = confine_listing(read_folder(folder), roots=resolved_roots(roots))
            manifest = write_listing(folder, items, refused, db=settings.db, collection=settings.collection)
            job = IndexJob(replace(settings, source=manifest, follow_links=False), str(folder), len(items), refused,
                           encoder=encoder)
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
