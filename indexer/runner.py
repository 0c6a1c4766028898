"""The runner: read -> plan -> decode -> embed -> write -> index, each stage timed, with a progress bar.

Incremental and crash-safe. The plan compares the source with the collection: new files are indexed;
a file whose size or mtime changed is hashed, and re-indexed only if its content hash changed; rows of
files no longer in the source are dropped. Rows are appended in large batches, captions before their
image, so a run killed at any moment leaves only whole images (plus orphan captions that the next run's
reconcile step drops); running the same command again finishes the job with exactly the rows an
uninterrupted run makes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipdex.exceptions import StoreError
from clipdex.files import atomic_write, hash_file, remove_stale_temp_files
from clipdex.indexer.decode import DecodePool
from clipdex.indexer.device_decode import check_decode, device_decoder_for
from clipdex.indexer.embed import Embedder
from clipdex.indexer.ray_engine import RayConfig
from clipdex.indexer.reader import SourceItem, SourceListing, read_source
from clipdex.indexer.writer import StoreWriter
from clipdex.retrieval.models.images import DEFAULT_MAX_PIXELS
from clipdex.retrieval.store.faiss_index import IndexConfig, load_for, remove_unreferenced
from clipdex.retrieval.store.integrity import record_checksums
from clipdex.retrieval.store.lock import writer_lock
from clipdex.retrieval.store.record import DEFAULT_COLLECTION, DEFAULT_DB, Collection, Database
from clipdex.retrieval.store.rerank import grid_layout_for
from clipdex.retrieval.store.schema import check_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexSettings:
    """What ``clipdex index`` does.

    source: a folder (walked recursively) or a manifest (.parquet/.csv/.jsonl with a path column).
    split: only the manifest rows of this split.
    batch_size: images per encoder batch. workers: decoding processes (None: cores - 1).
    decode: where JPEGs are decoded: ``cpu`` (the workers, with PIL), ``device`` (batches on the encoder's device,
        nvJPEG on CUDA: :mod:`clipdex.indexer.device_decode`; other formats and refused JPEGs stay on the CPU) or
        ``auto`` (device when the encoder runs on CUDA, else cpu). The default is ``cpu`` until the device path has been
        measured on a GPU (it is tested on the CPU only).
    flush_rows: images per LanceDB commit (large appends, few fragments); flush_seconds: commit at least this
        often too, so a failure late in a long run loses at most this much work.
    lock_wait: seconds to wait for another writer of the collection to finish (0: refuse at once).
    keep_versions_seconds: old LanceDB versions younger than this are kept after the run (a reader that opened
        one may still be reading it); older ones, and the data files only they use, are deleted.
    rehash: hash every file, not only those whose size or mtime changed.
    follow_links: False refuses any file that is a symbolic link when it is opened (the app: its listing is
        checked against its roots, and a file swapped for a link afterwards must not be read).
    max_pixels: larger images are skipped as decompression bombs.
    grids: a new collection also stores each image's patch-token grid when the encoder gives one (what a
        matcher re-ranks text searches with; 8 KiB per image for clipdex-world, about 7.6 GiB per million
        images). An existing collection keeps what it was made with.
    decode_timeout: a batch slower than this per file is retried file by file; a file that hangs is skipped.
    engine: "local", or "ray" to run the decode, embed and write stages on a Ray cluster (``ray``: which one and
        how; the same plan, rows, failures and FAISS build as the local engine).
    """

    source: str
    db: str = DEFAULT_DB
    collection: str = DEFAULT_COLLECTION
    model: str = "clipdex-world"
    split: str | None = None
    batch_size: int = 256
    workers: int | None = None
    decode: str = "cpu"  # cpu, device or auto (see clipdex.indexer.device_decode); cpu until a GPU run measures device
    device: str = "auto"
    precision: str = "auto"
    runtime: str = "auto"  # torch, onnx or auto (see retrieval.models.encoder.DualEncoder)
    flush_rows: int = 4096
    flush_seconds: float = 30.0
    lock_wait: float = 0.0
    keep_versions_seconds: float = 60.0
    rehash: bool = False
    follow_links: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_timeout: float = 10.0  # seconds per file a batch may take before its files are retried one by one
    build_index: bool = True
    grids: bool = True
    index: IndexConfig = field(default_factory=IndexConfig)
    engine: str = "local"  # local (this process and its decoding workers) or ray (Ray Data: see ray_engine)
    ray: RayConfig = field(default_factory=RayConfig)  # where and how the ray engine runs


@dataclass
class Plan:
    """What a run has to do, from comparing the source with the collection."""

    todo: list[SourceItem]
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    touched: list[tuple[str, float, int]] = field(default_factory=list)  # same content, new (mtime, size)
    replace: set[str] = field(default_factory=set)  # ids of changed files: old rows go when the new are written
    remove: list[str] = field(default_factory=list)  # ids of files no longer in the source
    removed: int = 0


def plan_run(collection: Collection, listing: SourceListing, *, rehash: bool = False,
             follow_links: bool = True) -> Plan:
    """Compare a source listing with what ``collection`` holds from that source (by id); without
    ``follow_links`` a file that is now a symbolic link is never hashed (it goes to the decoder, which
    refuses it)."""
    existing = collection.existing(listing.source)
    plan = Plan(todo=[])
    listed = set()
    for item in listing.items:
        listed.add(item.id)
        row = existing.get(item.id)
        if row is None:
            plan.todo.append(item)
            plan.new += 1
            continue
        same_entry = row.path == item.path and row.captions == tuple(item.captions)
        if same_entry and not rehash and row.size == item.size and row.mtime == item.mtime:
            plan.unchanged += 1
            continue
        try:
            same = (same_entry and (follow_links or not os.path.islink(item.path))
                    and hash_file(item.path) == row.content_hash)
        except OSError:
            same = False
        if same:
            plan.unchanged += 1
            if (row.mtime, row.size) != (item.mtime, item.size):
                plan.touched.append((row.id, item.mtime, item.size))
        else:
            plan.todo.append(item)
            plan.replace.add(row.id)
            plan.changed += 1
    plan.remove = [i for i in existing if i not in listed]
    plan.removed = len(plan.remove)
    _check_id_clash(collection, listing.source, plan.todo)
    return plan


def _check_id_clash(collection: Collection, source: str, todo: list[SourceItem]) -> None:
    if not todo:
        return
    t = collection.rows(columns=["id", "source"])
    other = {i: s for i, s in zip(t["id"].to_pylist(), t["source"].to_pylist()) if s != source}
    clash = [it.id for it in todo if it.id in other]
    if clash:
        raise StoreError(f"{len(clash)} ids are already in collection {collection.name!r} from another source "
                         f"(e.g. {clash[0]!r} from {other[clash[0]]}); index this source into another --collection")


ENGINES = ("local", "ray")
ProgressHook = Callable[[int, int], None]  # (files of the source handled so far, files in the source)


class IndexStopped(StoreError):
    """Raised by a progress hook to end a run after the batch it is on; the run commits what it embedded
    (a re-run indexes the rest) and re-raises it."""


def run_index(settings: IndexSettings, *, progress: bool = True, on_progress: ProgressHook | None = None,
              encoder=None) -> dict:
    """Index ``settings.source`` into the collection; returns the JSON summary (counts, timings, failures).

    ``on_progress(done, total)`` is called once the plan is made and after every batch (done counts the
    unchanged files too); it may raise :class:`IndexStopped` to end the run there, with what was embedded
    committed. ``encoder``: an already loaded :class:`DualEncoder` for ``settings.model`` (a long-
    lived process such as the app reuses its own instead of loading a second copy)."""
    from clipdex.retrieval.models.images import default_workers
    from clipdex.retrieval.models.spec import parse_model_spec

    t_start = time.perf_counter()
    check_name(settings.collection)  # a bad name fails before the database folder is created
    parse_model_spec(settings.model)  # a mistyped spec fails before any work
    if settings.engine not in ENGINES:
        raise StoreError(f"unknown engine {settings.engine!r}: use one of {', '.join(ENGINES)}")
    check_decode(settings.decode)
    if settings.engine == "ray" and settings.decode == "device":
        raise StoreError("--decode device runs in the indexing process: use it with --engine local")
    if settings.engine == "ray":  # decoding happens in Ray tasks: no local pool
        from clipdex.indexer.ray_engine import ray_session

        with ray_session(settings.ray), DecodePool(0) as pool:
            return _run(settings, pool, progress=progress, t_start=t_start, on_progress=on_progress, encoder=encoder)
    workers = default_workers() if settings.workers is None else settings.workers
    with DecodePool(workers, timeout=settings.decode_timeout) as pool:  # started first: ready when needed
        return _run(settings, pool, progress=progress, t_start=t_start, on_progress=on_progress, encoder=encoder)


@dataclass
class PreparedRun:
    """What a run works from once the source is read, the model loaded and the plan made (what either engine's
    index loop is given)."""

    listing: SourceListing
    encoder: object  # None when the plan has nothing to embed (the model is then never loaded)
    db: Database
    collection: Collection
    plan: Plan
    orphans: int  # captions of a killed run dropped by reconcile
    duplicates: dict[str, int]  # rows of duplicated ids removed, by table


@dataclass
class LoopResult:
    """What an index loop did (either engine's): the writer (rows written, its seconds), failures and timings."""

    writer: StoreWriter  # or the Ray engine's FragmentCommitter: written, commits, seconds
    embed_seconds: float
    failures: list[dict]
    decode_wait: float | None  # None: not measured (the Ray engine's stages overlap on other machines)
    decode_cpu: float
    seconds: float
    engine: dict = field(default_factory=lambda: {"name": "local"})
    first_batch_at: float | None = None  # perf_counter when the first batch went to the encoder (None: none did)
    device_decode: float | None = None  # seconds decoding JPEGs on the device (None: the workers decoded them all)


def _run(settings: IndexSettings, pool: DecodePool, *, progress: bool, t_start: float,
         on_progress: ProgressHook | None, encoder) -> dict:
    times: dict[str, float] = {}
    listing = _read(settings, times=times)
    db = Database(settings.db, create=True)
    with writer_lock(db.path, settings.collection, wait=settings.lock_wait):
        removed = remove_stale_temp_files(db.path / "_faiss") + remove_unreferenced(db.path, settings.collection)
        if removed:
            logger.warning("removed %d files a killed run left in %s", len(removed), db.path / "_faiss")
        prep = _prepare(settings, listing, db, encoder=encoder, times=times)
        if not prep.plan.todo:
            loop = _nothing_to_embed(settings, prep, progress=progress, on_progress=on_progress)
        elif settings.engine == "ray":
            from clipdex.indexer.ray_engine import index_loop as ray_index_loop

            loop = ray_index_loop(settings, prep, progress=progress, on_progress=on_progress)
        else:
            loop = _index_loop(settings, prep, pool, progress=progress, on_progress=on_progress)
        return _finish(settings, prep, loop, workers=pool.workers, times=times, t_start=t_start)


def _read(settings: IndexSettings, *, times: dict[str, float]) -> SourceListing:
    """List the source; a source with no image at all is refused before anything is created."""
    t0 = time.perf_counter()
    listing = read_source(settings.source, split=settings.split)
    times["read"] = time.perf_counter() - t0
    if not listing.items:
        why = (f"none of its {len(listing.missing)} files exist (e.g. {listing.missing[0][0]})" if listing.missing
               else "it holds no image files")
        raise StoreError(f"nothing to index in {settings.source}: {why}. Nothing was created or changed")
    return listing


def _prepare(settings: IndexSettings, listing: SourceListing, db: Database, *, encoder,
             times: dict[str, float]) -> PreparedRun:
    """Plan the run, load the encoder when there is something to embed (a run with nothing new or changed never
    loads it), open or create the collection, repair what a killed or concurrent run left and apply the plan's
    deletes and touches. A model that does not match the collection is refused before anything changes."""
    t0 = time.perf_counter()
    collection = db.open(settings.collection) if settings.collection in db.collections() else None
    plan = None
    if collection is not None:
        plan = plan_run(collection, listing, rehash=settings.rehash, follow_links=settings.follow_links)
    times["plan"] = time.perf_counter() - t0
    if encoder is None and (plan is None or plan.todo or not _same_spec(settings.model, collection)):
        from clipdex.retrieval.models.encoder import load_encoder

        t0 = time.perf_counter()
        encoder = load_encoder(settings.model, device=settings.device, precision=settings.precision,
                               runtime=settings.runtime)
        times["load_model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if collection is None:
        grid = grid_layout_for(encoder) if settings.grids else None
        collection = db.open_or_create(settings.collection, info=encoder.info, grid=grid,
                                       image_precision=encoder.image_precision)
    elif encoder is not None:
        collection.check_encoder(encoder.info, action="append to", image_precision=encoder.image_precision)
    duplicates = collection.remove_duplicates()
    if duplicates["images"] or duplicates["captions"]:
        logger.warning("collection %s held %d duplicate image rows and %d duplicate caption rows (from runs of an "
                       "older clipdex writing at once); removed them", settings.collection, duplicates["images"],
                       duplicates["captions"])
    orphans = collection.reconcile()
    if plan is None:
        plan = plan_run(collection, listing, rehash=settings.rehash, follow_links=settings.follow_links)
    if plan.remove:
        collection.delete_images(plan.remove)
    collection.touch(plan.touched)
    times["plan"] += time.perf_counter() - t0
    return PreparedRun(listing, encoder, db, collection, plan, orphans, duplicates)


def _same_spec(model: str, collection: Collection) -> bool:
    """Whether ``model`` is typed as the collection records its encoder (then a run with nothing to embed need not
    load it to compare weights: it writes no vector)."""
    from clipdex.retrieval.models.spec import parse_model_spec

    return parse_model_spec(model).text == collection.encoder_info().spec


class LoopProgress:
    """What both engines' index loops report as they go: the progress bar, the ``on_progress`` hook (called
    once the plan is made, then after every batch) and the failures (the listing's missing files first)."""

    def __init__(self, settings: IndexSettings, prep: PreparedRun, *, progress: bool,
                 on_progress: ProgressHook | None, label: str = ""):
        from tqdm import tqdm

        listing, todo = prep.listing, prep.plan.todo
        self.on_progress = on_progress
        self.total = len(listing.items) + len(listing.missing)
        self.handled = self.total - len(todo)
        self.failures = [{"path": p, "reason": r} for p, r in listing.missing]
        self._missing = len(listing.missing)
        if on_progress:
            on_progress(self.handled, self.total)
        self.bar = tqdm(total=len(todo), unit="img", desc=f"indexing into {settings.collection}{label}",
                        disable=not progress or not todo, dynamic_ncols=True)

    def batch(self, count: int, failures: list[dict]) -> None:
        """``count`` more files handled, ``failures`` among them; the hook may raise :class:`IndexStopped`."""
        self.failures += failures
        self.bar.update(count)
        self.handled += count
        self.bar.set_postfix(failed=len(self.failures) - self._missing, refresh=False)
        if self.on_progress:
            self.on_progress(self.handled, self.total)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


def _index_loop(settings: IndexSettings, prep: PreparedRun, pool: DecodePool, *, progress: bool,
                on_progress: ProgressHook | None) -> LoopResult:
    """Decode, embed and write the plan's files, batch by batch, with a progress bar."""
    plan, encoder = prep.plan, prep.encoder
    embedder = Embedder(encoder)
    writer = StoreWriter(prep.collection, source=prep.listing.source, flush_rows=settings.flush_rows,
                         flush_seconds=settings.flush_seconds, replace=plan.replace)
    decode_cpu = wait = 0.0
    t_loop = time.perf_counter()
    device_decoder = device_decoder_for(encoder, decode=settings.decode, max_pixels=settings.max_pixels)
    report = LoopProgress(settings, prep, progress=progress, on_progress=on_progress)
    try:
        batches = pool.batches(plan.todo, encoder.preprocess, batch_size=settings.batch_size,
                               max_pixels=settings.max_pixels, draft_size=encoder.info.image_size,
                               follow_links=settings.follow_links, device_jpeg=device_decoder is not None)
        t_wait = time.perf_counter()
        first = None
        for batch in batches:
            wait += time.perf_counter() - t_wait
            decode_cpu += batch["decode_seconds"]
            if device_decoder is not None:
                batch = device_decoder.finish(batch)
            if batch["pixels"] is not None:
                first = first or time.perf_counter()
                _write_batch(writer, embedder, batch, [plan.todo[p] for p in batch["pos"]])
            report.batch(batch["count"], [{"path": plan.todo[p].path, "reason": r} for p, r in batch["errors"]])
            t_wait = time.perf_counter()
        writer.flush()
    except IndexStopped:
        writer.flush()  # every row it holds is whole: keep them
        raise
    finally:
        report.close()
    engine = {"name": "local", "decode": "cpu" if device_decoder is None else f"device ({encoder.device})"}
    if device_decoder is not None:
        engine["device_decode_fallbacks"] = device_decoder.fallbacks
    return LoopResult(writer, embedder.seconds, report.failures, wait, decode_cpu, time.perf_counter() - t_loop,
                      engine=engine, first_batch_at=first,
                      device_decode=None if device_decoder is None else device_decoder.seconds)


def _nothing_to_embed(settings: IndexSettings, prep: PreparedRun, *, progress: bool,
                      on_progress: ProgressHook | None) -> LoopResult:
    """The loop of a run whose plan has nothing to embed (either engine): only the missing files to report."""
    t0 = time.perf_counter()
    report = LoopProgress(settings, prep, progress=progress, on_progress=on_progress)
    report.close()
    writer = StoreWriter(prep.collection, source=prep.listing.source)
    return LoopResult(writer, 0.0, report.failures, 0.0, 0.0, time.perf_counter() - t0,
                      engine={"name": settings.engine})


def _write_batch(writer: StoreWriter, embedder: Embedder, batch: dict, items: list[SourceItem]) -> None:
    """Embed one decoded batch (images, with their grids when the collection stores them, and their captions)
    and hand the rows to the writer."""
    if writer.grid is not None:
        img_vec, grids = embedder.images_with_grids(batch["pixels"])
    else:
        img_vec, grids = embedder.images(batch["pixels"]), [None] * len(items)
    cap_vec = embedder.texts([c for it in items for c in it.captions])
    c = 0
    for it, h, w, ht, v, g in zip(items, batch["hash"], batch["width"], batch["height"], img_vec, grids):
        n = len(it.captions)
        writer.add(it, content_hash=h, width=w, height=ht, vector=v, caption_vectors=cap_vec[c:c + n], grid=g)
        c += n


def _finish(settings: IndexSettings, prep: PreparedRun, loop: LoopResult, *, workers: int, times: dict[str, float],
            t_start: float) -> dict:
    """Compact, build the FAISS indexes, and write and return the run's summary."""
    listing, plan, collection, writer = prep.listing, prep.plan, prep.collection, loop.writer
    t0 = time.perf_counter()
    collection.compact(keep_versions_seconds=settings.keep_versions_seconds)  # old versions go even if nothing changed
    record_checksums(collection)
    times["compact"] = time.perf_counter() - t0
    indexes = {}
    t0 = time.perf_counter()
    if settings.build_index:
        for table in ("images", "captions"):
            indexes[table] = load_for(collection, table, config=settings.index).sidecar  # rebuilt if stale
    times["faiss"] = time.perf_counter() - t0
    if loop.first_batch_at is not None:  # from the call to the first batch's embedding: what a user waits first
        times["to_first_batch"] = loop.first_batch_at - t_start
    times.update({"decode_wait": loop.decode_wait, "decode_worker_cpu": loop.decode_cpu,
                  "device_decode": loop.device_decode, "embed": loop.embed_seconds,
                  "write": writer.seconds, "index_loop": loop.seconds, "total": time.perf_counter() - t_start})
    times = {k: v for k, v in times.items() if v is not None}
    summary = {
        "source": listing.source, "db": str(prep.db.path), "collection": settings.collection,
        "model": prep.collection.encoder_info().spec, "workers": workers,
        "device": str(prep.encoder.device) if prep.encoder is not None else None,  # None: nothing to embed, not loaded
        "runtime": prep.encoder.runtime if prep.encoder is not None else None,
        "engine": loop.engine,
        "counts": {"seen": len(listing.items) + len(listing.missing), "new": plan.new, "changed": plan.changed,
                   "unchanged": plan.unchanged, "removed": plan.removed, "indexed": writer.written,
                   "failed": len(loop.failures), "ignored_non_images": len(listing.ignored),
                   "ignored_by_extension": listing.ignored_by_extension(),
                   "orphan_captions_dropped": prep.orphans, "images_in_collection": collection.count(),
                   "captions_in_collection": collection.caption_count()},
        "images_per_s": (writer.written / loop.seconds) if loop.seconds > 0 and writer.written else None,
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "failures": loop.failures,
        "ignored": [{"path": p, "reason": r} for p, r in listing.ignored],  # not images by type: never decoded
        "faiss": indexes,
        "grid": collection.grid_layout(),  # the patch-token grids stored with each image (None: none)
        "settings": {k: v for k, v in asdict(settings).items() if k != "index"},
    }
    summary["repaired"] = {"duplicate_image_rows": prep.duplicates["images"],
                           "duplicate_caption_rows": prep.duplicates["captions"]}
    summary["disk"] = collection.disk_usage()
    _write_report(prep.db.path, settings.collection, summary)
    return summary


def _write_report(db_dir: Path, collection: str, summary: dict) -> None:
    path = db_dir / "_reports" / f"{collection}-last-index.json"
    try:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
    except OSError as e:
        logger.warning("could not write the index report %s: %s", path, e)
