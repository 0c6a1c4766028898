"""What a running ``clipdex serve`` holds: each model loaded once, each collection opened once with its FAISS
indexes (reopened when its tables change), the answering backend, the index jobs, and the locks: encoder
passes take turns (concurrent text queries are embedded in one batch, :mod:`clipdex.server.batching`),
answers take turns among themselves, beside the searches, and FAISS searches take turns (each is short).

A collection's LanceDB table versions are compared with the loaded ones at most every
``settings.recheck_seconds``; when they differ (an index run of this server, of the CLI or of the app) the
collection is reopened on that request, so new rows are searchable without a restart. While this server's
own index run writes into a collection, the last loaded state keeps serving (its FAISS indexes are rebuilt
once, by the run itself). The collection loader is the app's (:func:`clipdex.app.collections.load_collection`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from clipdex.app.collections import LoadedCollection, load_collection
from clipdex.app.jobs import IndexJob, IndexJobs
from clipdex.exceptions import ClipdexError, StoreError
from clipdex.retrieval.store.record import Database
from clipdex.server.batching import TextBatcher
from clipdex.server.settings import ServeSettings

logger = logging.getLogger(__name__)


class NotFound(ClipdexError):
    """An unknown collection, image or job (HTTP 404)."""


@dataclass
class _Entry:
    loaded: LoadedCollection
    versions: dict[str, int]
    checked: float  # time.monotonic() of the last version check


class ServerState:
    """The server's loaded models and collections (thread-safe: requests run in a thread pool)."""

    def __init__(self, settings: ServeSettings):
        if not Path(settings.db).is_dir():
            raise StoreError(f"no database at {settings.db}: index a folder into it first "
                             f"(clipdex index FOLDER --db {settings.db})")
        self.settings = replace(settings, max_pixels=settings.max_pixels or _default_max_pixels())
        self.db = Database(settings.db)
        self.jobs = IndexJobs(per="collection")
        self.model_lock = threading.Lock()  # one encoder pass at a time: two would only share the same cores
        self.answer_lock = threading.Lock()  # one answer generated at a time (beside, not behind, the searches)
        self.store_lock = threading.Lock()  # FAISS searches and index reloads, one at a time (each is short)
        self.text_batcher = TextBatcher(lock=self.model_lock)
        self._lock = threading.Lock()  # guards the caches below (loading happens under it: once per change)
        self._encoders: dict[str, object] = {}
        self._entries: dict[str, _Entry] = {}
        self._backend = None
        self._names: tuple[float, list[str]] | None = None  # (when listed, the database's collections)

    def names(self) -> list[str]:
        """The collections this server serves, as the database listed them at most ``recheck_seconds`` ago."""
        now = time.monotonic()
        cached = self._names
        if cached is None or now - cached[0] >= self.settings.recheck_seconds:
            cached = self._names = (now, self.db.collections())
        return [n for n in cached[1] if not self.settings.collections or n in self.settings.collections]

    def check_name(self, name: str) -> str:
        """``name`` if this server serves it; :class:`NotFound` otherwise."""
        if name not in self.names():
            served = ", ".join(self.names()) or "none"
            raise NotFound(f"no collection {name!r} here (served: {served})")
        return name

    def encoder(self, spec: str):
        """The dual encoder for ``spec``, loaded on first use and shared by every collection indexed with it."""
        with self._lock:
            if spec not in self._encoders:
                from clipdex.retrieval.models.encoder import load_encoder

                self._encoders[spec] = load_encoder(spec, device=self.settings.device, runtime=self.settings.runtime)
            return self._encoders[spec]

    def collection(self, name: str) -> LoadedCollection:
        """``name`` ready for queries: the loaded state, reopened first when its tables changed."""
        self.check_name(name)
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and now - entry.checked < self.settings.recheck_seconds:
                return entry.loaded
            job = self.jobs.latest(self.settings.db, name)
            if entry is not None and job is not None and job.running:
                return entry.loaded  # the run rebuilds the FAISS indexes once, when it ends
            col = self.db.open(name)
            versions = col.versions()
            if entry is not None and versions == entry.versions:
                entry.checked = now
                return entry.loaded
            spec = col.encoder_info().spec
        enc = self.encoder(spec)
        with self._lock:
            t0 = time.perf_counter()
            loaded = load_collection(self.settings.db, name, encoder=enc, index_roots=self.settings.index_roots)
            self._entries[name] = _Entry(loaded, versions, now)
            logger.info("opened collection %s (%d images) in %.2f s", name, len(loaded.ids), time.perf_counter() - t0)
            return loaded

    def fresh_collection(self, name: str) -> LoadedCollection | None:
        """``name``'s loaded state when its tables were checked less than ``recheck_seconds`` ago, else None:
        no I/O and no waiting, so the event loop may ask (None: ask :meth:`collection` in a thread)."""
        entry = self._entries.get(name)
        if entry is None or time.monotonic() - entry.checked >= self.settings.recheck_seconds:
            return None
        return entry.loaded

    def backend(self):
        """The built-in answering decoder, loaded on first use."""
        with self._lock:
            if self._backend is None:
                from clipdex.retrieval.answer.answerer import BuiltinBackend

                self._backend = BuiltinBackend(self.settings.decoder or None, device=self.settings.device)
            return self._backend

    def preload(self) -> None:
        """Open every served collection now (model, FAISS indexes), so the first request does not wait; a
        collection that cannot be opened is logged and left to fail on its own requests."""
        for name in self.names():
            try:
                self.collection(name)
            except ClipdexError as e:
                logger.warning("collection %s is not searchable: %s", name, e)

    def job(self, job_id: str) -> IndexJob:
        """The index job with this id; :class:`NotFound` otherwise."""
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} in this server (jobs are kept until it stops)")
        return job


def _default_max_pixels() -> int:
    from clipdex.retrieval.models.images import DEFAULT_MAX_PIXELS

    return DEFAULT_MAX_PIXELS
