"""The Ray engine (``clipdex index --engine ray``): the local engine's run with its decode, embed and write stages
as Ray Data operators, so that a cluster does the work. The ONLY module that imports Ray.

The driver does what the local engine does before and after the loop, with the same code
(:mod:`clipdex.indexer.runner`: read the source, take the collection's writer lock, load the encoder once for
its description and grid layout, repair, plan; afterwards compact, checksum, build FAISS, report). The loop is
one Ray Data pipeline over the plan's files::

    the files to do, in blocks of --batch-size
      -> decode   CPU tasks (map_batches): the local engine's DecodeItems (same hash, decode rules, errors)
      -> embed    an actor pool; each actor loads the model once (on a GPU share with --num-gpus-per-worker)
      -> write    CPU tasks: the local engine's Rows, then new Lance data files (uncommitted fragments)
      -> driver   gathers the fragments as they arrive and commits them every --flush-rows images or 30 s:
                  captions, then images (the commit point), one Lance commit per table

Crash safety is the local engine's: every commit holds whole images, so a run killed at any point leaves only
whole images (and at most the captions of one commit, which the next run's reconcile drops), and the same
command again indexes exactly the rest. A worker that dies costs its batch: Ray Data retries the task (a dead
embed actor is restarted and reloads the model); data files a dead task wrote are never committed and go at the
next compaction.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from clipdex.exceptions import ClipdexError, ModelMismatchError
from clipdex.indexer.reader import SourceItem
from clipdex.indexer.writer import Rows
from clipdex.retrieval.store.record import Collection, write_fragments

if TYPE_CHECKING:
    from clipdex.indexer.runner import IndexSettings, LoopResult, PreparedRun

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayConfig:
    """Where and how the Ray engine runs.

    address: a running cluster ("auto": the one ``ray start`` made on this machine; "ray://host:10001": a remote
        one through Ray Client; "host:6379"); None starts a local cluster of this machine's cores for the run (or
        uses the one this process already joined with ``ray.init``).
    num_gpus_per_worker: GPUs each embed actor takes (0: CPU actors; 0.25: four actors share a GPU).
    embed_actors: size of the embed actor pool; None: one per GPU share when actors take GPUs
        (GPUs in the cluster / num_gpus_per_worker), else one.
    cpus_per_worker: CPUs each embed actor reserves (its torch threads); decode and write tasks take one each.
    """

    address: str | None = None
    num_gpus_per_worker: float = 0.0
    embed_actors: int | None = None
    cpus_per_worker: float = 1.0


class RayEngineError(ClipdexError):
    """The Ray engine cannot run: Ray or Lance is not installed, the cluster cannot be reached, or it has not the
    resources asked for."""


def require_ray():
    """The ``ray`` module, or a :class:`RayEngineError` saying what to install."""
    import importlib.util

    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayEngineError(f'--engine ray needs Ray Data ({e.name} is not installed): pip install "clipdex[ray]"') \
            from e
    if importlib.util.find_spec("lance") is None:  # found, not imported: Lance warns on every fork once loaded
        raise RayEngineError('--engine ray needs Lance for its fragment writes (pylance is not installed; it comes with clipdex): '
                             'pip install "pylance>=14,<15"')
    return ray


@contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """Ray joined for a run: the cluster ``config`` names, or a local one started (and shut down after); its
    resources checked against the embed pool asked for. Entered before the store opens, so that an unreachable
    or too small cluster fails before anything is created (and Ray's processes start before Lance loads)."""
    ray = require_ray()
    started = _connect(ray, config)
    try:
        _actor_count(ray, config)
        yield
    finally:
        if started:
            ray.shutdown()


def _connect(ray, config: RayConfig) -> bool:
    """Join the cluster ``config`` names (or start a local one); returns whether this call started Ray."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    try:
        if config.address:
            ray.init(address=config.address, **kwargs)
        else:
            ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = config.address or "a local cluster"
        raise RayEngineError(f"cannot start or reach the Ray cluster at {where}: {e}") from e
    return True


def _actor_count(ray, config: RayConfig) -> int:
    """The embed pool's size, checked against what the cluster has (a pool that takes every CPU would leave none
    for decoding: the run would wait forever)."""
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    g = config.num_gpus_per_worker
    if g > 0 and gpus < g:
        raise RayEngineError(f"--num-gpus-per-worker {g:g}: the Ray cluster has {gpus:g} GPUs")
    n = config.embed_actors or (max(1, math.floor(gpus / g + 1e-9)) if g > 0 else 1)
    if g > 0 and n * g > gpus + 1e-9:
        raise RayEngineError(f"{n} embed actors x {g:g} GPUs each = {n * g:g} GPUs; the Ray cluster has {gpus:g}")
    if n * config.cpus_per_worker + 1 > cpus + 1e-9:
        raise RayEngineError(f"{n} embed actors x {config.cpus_per_worker:g} CPUs each leave no CPU for decoding: "
                             f"the Ray cluster has {cpus:g} CPUs (use fewer --embed-actors)")
    return n


def _todo_blocks(todo: list[SourceItem], block_rows: int) -> list[pa.Table]:
    """The plan's files as Arrow blocks of ``block_rows``: the pipeline's input, one decode task per block."""
    table = pa.table({
        "pos": pa.array(range(len(todo)), pa.int64()),
        "id": [it.id for it in todo], "path": [it.path for it in todo],
        "size": pa.array([it.size for it in todo], pa.int64()), "mtime": [float(it.mtime) for it in todo],
        "captions": [json.dumps(list(it.captions)) for it in todo],  # JSON: one string column travels as Arrow
    })
    return [table.slice(a, block_rows) for a in range(0, len(todo), block_rows)]


def _items(batch: dict) -> list[SourceItem]:
    return [SourceItem(id=str(i), path=str(p), captions=tuple(json.loads(caps)), size=int(s), mtime=float(m))
            for i, p, caps, s, m in zip(batch["id"], batch["path"], batch["captions"], batch["size"],
                                        batch["mtime"])]


def _decode(batch: dict, *, transform, max_pixels: int, draft_size: int | None, follow_links: bool,
            image_size: int) -> dict:
    """Decode stage (a CPU task): the local engine's decoder on each file of the batch; a file that cannot be
    decoded keeps its row, with its reason in ``error`` and zero pixels."""
    from clipdex.indexer.decode import DecodeItems

    items = _items(batch)
    ds = DecodeItems(items, transform, max_pixels=max_pixels, draft_size=draft_size, follow_links=follow_links)
    out = [ds[i] for i in range(len(items))]
    pixels = np.zeros((len(items), 3, image_size, image_size), np.float32)
    for k, o in enumerate(out):
        if o["error"] is None:
            pixels[k] = o["pixels"].numpy()
    return {**batch, "pixels": pixels,
            "content_hash": np.array([o["hash"] for o in out], dtype=object),
            "width": np.array([o["width"] for o in out], np.int32),
            "height": np.array([o["height"] for o in out], np.int32),
            "error": np.array([o["error"] or "" for o in out], dtype=object),
            "decode_seconds": np.array([o["seconds"] for o in out], np.float64)}


class _EmbedActor:
    """Embed stage: one actor of the pool, the model loaded once when it starts and checked against the
    encoder the collection records (a worker with other weights is refused, not mixed in)."""

    def __init__(self, *, model: str, device: str, precision: str, runtime: str, expect: dict, grid: dict | None):
        from clipdex.indexer.embed import Embedder
        from clipdex.retrieval.models.encoder import load_encoder

        encoder = load_encoder(model, device=device, precision=precision, runtime=runtime)
        got = encoder.info.as_dict()
        if got != expect:
            diff = {k: (expect.get(k), v) for k, v in got.items() if expect.get(k) != v}
            raise ModelMismatchError(f"the embed actor on {os.uname().nodename} loaded {model!r} with "
                                     f"{diff} (collection, actor): every worker needs the same weights")
        self.embedder = Embedder(encoder)
        self.grid = grid  # the collection's grid layout; None: it stores no grids

    def __call__(self, batch: dict) -> dict:
        import torch

        t0 = time.perf_counter()
        n = len(batch["id"])
        ok = np.array([e == "" for e in batch["error"]], bool)
        pixels = torch.from_numpy(np.ascontiguousarray(batch.pop("pixels")[ok]))
        dim = self.embedder.encoder.info.embed_dim
        vectors = np.zeros((n, dim), np.float32)
        out = {}
        if self.grid is not None:  # the same shape in every batch (blocks are joined before the write stage)
            out["grid"] = np.zeros((n, self.grid["cells"], self.grid["width"]), np.float16)
        if ok.any():
            if self.grid is not None:
                vectors[ok], out["grid"][ok] = self.embedder.images_with_grids(pixels)
            else:
                vectors[ok] = self.embedder.images(pixels)
        caps = [json.loads(c) if k else [] for c, k in zip(batch["captions"], ok)]
        flat = self.embedder.texts([str(c) for cs in caps for c in cs])
        cap_bytes, c = [], 0
        for cs in caps:
            cap_bytes.append(np.ascontiguousarray(flat[c:c + len(cs)], np.float32).tobytes())
            c += len(cs)
        seconds = (time.perf_counter() - t0) / max(n, 1)
        return {**batch, **out, "vector": vectors, "caption_vectors": np.array(cap_bytes, dtype=object),
                "embed_seconds": np.full(n, seconds)}


def _write(batch: dict, *, targets: dict, source: str, dim: int, grid: dict | None, collection: str) -> dict:
    """Write stage (a CPU task): the batch's decoded files as new, uncommitted Lance fragments of both tables;
    returns one row for the driver (the fragments' JSON, the ids, the failures, timings)."""
    t0 = time.perf_counter()
    rows = Rows(source=source, dim=dim, grid=grid, collection_name=collection)
    failures = []
    for k, item in enumerate(_items(batch)):
        if batch["error"][k]:
            failures.append({"path": item.path, "reason": str(batch["error"][k])})
            continue
        caption_vectors = np.frombuffer(batch["caption_vectors"][k], np.float32).reshape(-1, dim)
        rows.add(item, content_hash=str(batch["content_hash"][k]), width=int(batch["width"][k]),
                 height=int(batch["height"][k]), vector=batch["vector"][k], caption_vectors=caption_vectors,
                 grid=batch["grid"][k] if grid is not None else None)
    frags = {"images": [], "captions": []}
    if len(rows):
        images, captions = rows.tables()
        if captions is not None:
            frags["captions"] = write_fragments(*targets["captions"], captions)
        frags["images"] = write_fragments(*targets["images"], images)
    return {"images": [json.dumps(frags["images"])], "captions": [json.dumps(frags["captions"])],
            "ids": [json.dumps([r["id"] for r in rows.images])], "failures": [json.dumps(failures)],
            "count": [len(batch["id"])], "decode_seconds": [float(np.sum(batch["decode_seconds"]))],
            "embed_seconds": [float(np.sum(batch["embed_seconds"]))],
            "write_seconds": [time.perf_counter() - t0]}


class FragmentCommitter:
    """The driver's side of the write stage: gathers the write tasks' fragments as they arrive and commits them
    every ``flush_rows`` images or ``flush_seconds`` seconds, whichever comes first (as the local engine's
    writer does), in one Lance commit per table (old rows of changed files out first); keeps what the summary
    reports (images written, commits, seconds)."""

    def __init__(self, collection: Collection, *, replace: set[str], flush_rows: int = 4096,
                 flush_seconds: float = 30.0):
        self.collection = collection
        self.replace = replace
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.written = 0
        self.commits = 0
        self.seconds = 0.0
        self._seen: set[str] = set()  # ids of every output taken, committed or waiting
        self._images: list[str] = []
        self._captions: list[str] = []
        self._ids: list[str] = []
        self._last_commit = time.monotonic()

    def add(self, out: dict) -> bool:
        """Take one write task's output (a row of the pipeline's result) and commit if the buffer is due; False
        when its rows were taken already (the output of a retried task that arrived twice: dropped, with its
        failures)."""
        ids = json.loads(out["ids"])
        if self._seen.intersection(ids):
            logger.warning("a write task's %d rows arrived twice (a retried task); kept the first", len(ids))
            return False
        self._seen.update(ids)
        self._ids += ids
        self._images += json.loads(out["images"])
        self._captions += json.loads(out["captions"])
        if len(self._ids) >= self.flush_rows or time.monotonic() - self._last_commit >= self.flush_seconds:
            self.flush()
        return True

    def flush(self) -> None:
        """Commit the fragments taken so far: changed files' old rows out, then captions, then images."""
        if not self._ids:
            return
        t0 = time.perf_counter()
        self.collection.commit_fragments(images=self._images, captions=self._captions,
                                         replace=[i for i in self._ids if i in self.replace])
        self.written += len(self._ids)
        self.commits += 1
        self._images, self._captions, self._ids = [], [], []
        self._last_commit = time.monotonic()
        self.seconds += time.perf_counter() - t0


def _pipeline(ray, settings: "IndexSettings", prep: "PreparedRun", actors: int):
    """The Ray Data dataset whose rows are the write tasks' outputs (lazy: iterating it runs the pipeline)."""
    cfg, encoder, collection = settings.ray, prep.encoder, prep.collection
    grid = collection.grid_layout()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the run has its own bar
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its start/finish notes and "progress bars disabled"
    ds = ray.data.from_arrow(_todo_blocks(prep.plan.todo, settings.batch_size))
    size = encoder.info.image_size
    batch_bytes = settings.batch_size * 3 * size * size * 4 * 2  # a decode task's pixels, in and out
    # the memory request also keeps Ray from fusing decoding into the embed actors (equal requests fuse): decoding
    # runs in parallel tasks on every CPU while the actors embed
    ds = ds.map_batches(_decode, batch_size=settings.batch_size, batch_format="numpy", num_cpus=1,
                        memory=batch_bytes, fn_kwargs={
        "transform": encoder.preprocess, "max_pixels": settings.max_pixels, "draft_size": encoder.info.image_size,
        "follow_links": settings.follow_links, "image_size": encoder.info.image_size})
    ds = ds.map_batches(
        _EmbedActor, batch_size=settings.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.num_gpus_per_worker or None,
        fn_constructor_kwargs={"model": settings.model, "device": settings.device if cfg.num_gpus_per_worker else
                               ("cpu" if settings.device == "auto" else settings.device),
                               "precision": settings.precision, "runtime": settings.runtime,
                               "expect": encoder.info.as_dict(), "grid": grid})
    return ds.map_batches(_write, batch_size=settings.batch_size, batch_format="numpy", num_cpus=1, fn_kwargs={
        "targets": collection.fragment_targets(), "source": prep.listing.source,
        "dim": encoder.info.embed_dim, "grid": grid, "collection": collection.name})


def index_loop(settings: "IndexSettings", prep: "PreparedRun", *, progress: bool, on_progress) -> "LoopResult":
    """The Ray engine's index loop: the plan's files through the pipeline, the write tasks' fragments committed
    as they arrive (every ``flush_rows`` images or ``flush_seconds``), with a progress bar that moves per batch;
    returns what the local loop returns (for the same summary)."""
    from clipdex.indexer.runner import IndexStopped, LoopProgress, LoopResult

    ray = require_ray()  # joined by ray_session
    committer = FragmentCommitter(prep.collection, replace=prep.plan.replace, flush_rows=settings.flush_rows,
                                  flush_seconds=settings.flush_seconds)
    seconds = {"decode": 0.0, "embed": 0.0, "write": 0.0}
    t_loop = time.perf_counter()
    actors = _actor_count(ray, settings.ray)
    res = ray.cluster_resources()
    engine = {"name": "ray", "address": settings.ray.address, "embed_actors": actors,
              "num_gpus_per_worker": settings.ray.num_gpus_per_worker,
              "cluster_cpus": res.get("CPU", 0), "cluster_gpus": res.get("GPU", 0),
              "nodes": len([n for n in ray.nodes() if n.get("Alive")])}
    report = LoopProgress(settings, prep, progress=progress, on_progress=on_progress, label=" (ray)")
    try:
        if prep.plan.todo:
            for out in _pipeline(ray, settings, prep, actors).iter_rows():
                if not committer.add(out):
                    continue
                for k in seconds:
                    seconds[k] += out[f"{k}_seconds"]
                report.batch(out["count"], json.loads(out["failures"]))  # may raise IndexStopped
        committer.flush()
    except IndexStopped:
        committer.flush()  # every row it holds is whole: keep them
        raise
    finally:
        report.close()
    engine["commits"] = committer.commits
    engine["worker_seconds"] = {k: round(v, 3) for k, v in seconds.items()}  # summed over workers
    return LoopResult(committer, seconds["embed"], report.failures, None, seconds["decode"],
                      time.perf_counter() - t_loop, engine=engine)
