"""The search accelerator: a FAISS index per table, built from LanceDB and persisted beside it.

Files, in ``<db>/_faiss/``: ``<collection>__<table>.<build>.faiss`` (the index), ``.<build>.ids.parquet`` (the
row each FAISS position stands for: id, and path or text) and ``<collection>__<table>.json`` (the sidecar,
written last, naming the build's two files: which LanceDB table version
and how many rows the index covers, which factory string built it, its measured recall@10 against exact
search, and the blake2b of the two other files). An index whose sidecar does not match the table's current
version is stale and rebuilt; one whose files do not match their checksums is damaged, and rebuilt from
LanceDB with a warning. On a read-only database the rebuilt index is kept in memory only.

Exact search (``Flat``, inner product on L2-normalised vectors = cosine) below
``IndexConfig.exact_threshold`` vectors; above it an inverted-file index of the full vectors, and above
``IndexConfig.compressed_threshold`` (2M) one of 8-bit scalar-quantized codes (IVF-SQ8, 264 bytes a vector instead
of ~1 KB at 256-d, with the recall it costs measured at build time; ``bench/README.md`` has the scale table). FAISS
runs the index on the GPU when the faiss-gpu build and CUDA are present, and says so in the log when it falls back
to the CPU.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipdex.exceptions import StoreError
from clipdex.files import atomic_write, content_hash, hash_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    """How FAISS indexes are built: exact, then an inverted file of full vectors, then of compressed codes.

    exact_threshold: at or below this many vectors, exact search (``Flat``): perfect recall, cost linear in
        the collection (about 1 ms per 10k 256-d vectors on one core).
    factory: the FAISS index-factory string from ``exact_threshold`` to ``compressed_threshold`` vectors;
        ``{nlist}`` is filled with ``4 * sqrt(N)`` lists (at most N / 39), the low end of FAISS's guideline of 4 to
        16 sqrt(N). ``IVF{nlist},Flat`` keeps full vectors: recall at nprobe 32 near exact's, memory 4 * D bytes
        per vector plus 8 for its id (1.0 GB per million 256-d vectors; 1.25 GB resident with the rows, measured).
    compressed_threshold: above this many vectors, ``compressed_factory`` instead of ``factory``. The default,
        2,000,000, is where ``IVF,Flat`` stops being reasonable beside the model on a 16 GB machine: 2.5 GB resident
        at search, ~6 GB at the peak of loading it (measured: 2.9 GB per million), more while building, and 10 GB
        resident at 8M. LanceDB keeps the exact vectors either way.
    compressed_factory: the factory string above ``compressed_threshold``; ``{nlist}`` as above and, for a
        product-quantizer factory such as ``IVF{nlist},PQ{m}x8``, ``{m}`` its sub-vectors: the largest divisor of
        D not above ``pq_bytes``. The default, ``IVF{nlist},SQ8``, stores each component in one byte (D bytes of
        code plus an 8-byte id per vector: 264 MB per million at 256-d, ~4x less than ``IVF,Flat``) and scores with
        the codes, so the true top 10 is found a little less often: recall@10 vs exact is recorded at every build.
        Measured on the benchmark's 1M synthetic 256-d vectors (nlist 4000, nprobe 32, 200 held-out queries,
        trained on 256k vectors with 2 threads; ``bench/compressed_recall.py``, ``bench/README.md``, *Scale*):
        ``IVF,SQ8`` recall@10 0.979, 268 B a vector in the index file, training 54 s;
        ``IVF,PQ128x8`` 0.869, 140 B, training 299 s; ``IVF,PQ64x8`` 0.579, 73 B, 157 s to build.
        SQ8 is the default because recall comes first; a PQ factory is the opt-in for memory (set
        ``compressed_factory``, and ``pq_bytes`` for its ``{m}``), at the recall above unless candidates are
        re-scored with their exact vectors, which clipdex does not do yet. ``OPQ{m},`` before ``IVF`` rotates the
        vectors to suit a product quantizer (not measured here). ``HNSW32`` was not chosen: its 64 base-level links
        per vector (256 bytes) cost as much memory as the SQ8 codes it would search, its build is slow on few
        cores, and it does not delete.
    pq_bytes: the most code bytes per vector of ``compressed_factory``'s ``{m}`` (unused by the default SQ8).
    nprobe: lists visited per query (higher: better recall, slower; the lists grow as sqrt(N), so nprobe 32
        scans about 32 * sqrt(N) / 4 vectors: 8k at 1M, 80k at 100M).
    recall_sample: queries (taken from the collection itself) used to measure recall@10 against exact.
    use_gpu: put the index on the GPU when faiss-gpu and CUDA are present.
    """

    exact_threshold: int = 50_000
    factory: str = "IVF{nlist},Flat"
    compressed_threshold: int = 2_000_000
    compressed_factory: str = "IVF{nlist},SQ8"
    pq_bytes: int = 64
    nprobe: int = 32
    recall_sample: int = 500
    use_gpu: bool = True

    def factory_for(self, n: int, *, dim: int | None) -> str:
        """The factory string for a table of ``n`` vectors of ``dim`` dimensions (``dim`` is read only above
        ``compressed_threshold`` and only by a factory with ``{m}``: None is enough otherwise)."""
        if n <= self.exact_threshold:
            return "Flat"
        # 4 sqrt(N) lists, but at least 39 training points per list (FAISS's minimum for stable k-means)
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        if n <= self.compressed_threshold:
            return self.factory.format(nlist=nlist)
        if not self.needs_dim:
            return self.compressed_factory.format(nlist=nlist)
        if dim is None:
            raise ValueError(f"factory_for({n}) needs the vectors' dimension above {self.compressed_threshold} vectors "
                             f"(for {self.compressed_factory}'s {{m}})")
        m = max(k for k in range(1, min(dim, self.pq_bytes) + 1) if dim % k == 0)
        return self.compressed_factory.format(nlist=nlist, m=m)

    @property
    def needs_dim(self) -> bool:
        """Whether ``compressed_factory`` has a ``{m}`` (a product quantizer's), which the dimension sets."""
        return "{m}" in self.compressed_factory


def build_faiss(vectors: np.ndarray, *, config: IndexConfig = IndexConfig(), seed: int = 0):
    """Build (and train, if it needs it) an inner-product index over ``vectors``; returns (index, factory)."""
    import faiss

    n, d = vectors.shape
    factory = config.factory_for(n, dim=d)
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # not IVF
        ivf = None
    if isinstance(ivf, faiss.IndexIVFPQ):  # an opt-in PQ factory; polysemous training orders the codes for
        ivf.do_polysemous_training = False  # Hamming pre-filtering, which clipdex never asks for: 10x the training
    if not index.is_trained:
        lists = ivf.nlist if ivf is not None else n // 64  # not an IVF index: FAISS subsamples on its own
        # 64 points per list: FAISS's k-means is stable from 39 and subsamples above 256 (2.56M vectors at 100M);
        # a product quantizer's 256-centroid codebooks (an opt-in PQ factory) take up to 65,536 (FAISS's own cap),
        # so at least that many above the threshold (the default SQ8 trains only each component's range)
        size = 64 * max(lists, 1)
        if n > config.compressed_threshold:
            size = max(size, 65_536)
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(n, size=min(n, size), replace=False))]
        index.train(sample)
    index.add(vectors)
    _set_nprobe(index, config.nprobe)
    return index, factory


def _set_nprobe(index, nprobe: int) -> None:
    import faiss

    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except (RuntimeError, AttributeError):
        pass


def to_gpu(index, *, use_gpu: bool = True):
    """Move ``index`` to GPU 0 when possible; logs the fallback otherwise."""
    if not use_gpu:
        return index
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        logger.debug("faiss is the CPU build; searching on the CPU (pip install clipdex[gpu] for GPU search)")
        return index
    if faiss.get_num_gpus() == 0:
        logger.info("faiss-gpu found no GPU; searching on the CPU")
        return index
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    except (RuntimeError, MemoryError) as e:  # an index type FAISS cannot run on the GPU, or no room there
        logger.warning("could not put the FAISS index on the GPU (%s); searching on the CPU", e)
        return index


def recall_vs_exact(index, vectors: np.ndarray, *, sample: int = 500, k: int = 10, seed: int = 0) -> float:
    """Recall@k of ``index`` against exact inner-product search, with ``sample`` collection vectors as queries
    (each query is itself in the collection, which flatters recall slightly: one of its k is easy)."""
    import faiss

    rng = np.random.default_rng(seed)
    q = vectors[rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(q, k)
    _, got = index.search(q, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, got)]))


SINGLE_THREAD_BELOW = 200_000  # one query over fewer vectors than this is faster on one FAISS thread


@dataclass
class LoadedIndex:
    """A FAISS index with the rows its positions stand for."""

    index: object
    rows: pa.Table  # id and the display column, in FAISS order
    sidecar: dict

    def __post_init__(self) -> None:
        # plain lists: a hit's id and path are then one list lookup each, not an Arrow scalar conversion
        self.columns = {c: self.rows[c].to_pylist() for c in self.rows.column_names}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions), each (Q, k); positions are -1 where fewer than k rows exist.

        A single query over a small index runs on one FAISS thread: waking OpenMP threads costs more than
        the scan, and FAISS's OpenMP runtime would spin against torch's (each wheel bundles its own).
        """
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if len(queries) == 1 and self.index.ntotal < SINGLE_THREAD_BELOW:
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            try:
                return self.index.search(queries, k)
            finally:
                faiss.omp_set_num_threads(threads)
        return self.index.search(queries, k)


def _paths(db_dir: Path, collection: str, table: str, sidecar: dict | None = None) -> dict[str, Path]:
    """The sidecar's path, and the index and ids files it names (each build writes files of its own, so a
    build killed half-way never mixes with the one the sidecar describes: the sidecar is the commit point)."""
    folder = db_dir / "_faiss"
    base = f"{collection}__{table}"
    files = (sidecar or {}).get("files") or {"index": f"{base}.faiss", "rows": f"{base}.ids.parquet"}  # pre-builds
    return {"index": folder / files["index"], "rows": folder / files["rows"], "sidecar": folder / f"{base}.json"}


def _build_files(collection: str, table: str) -> dict[str, str]:
    build = uuid.uuid4().hex[:12]
    return {"index": f"{collection}__{table}.{build}.faiss", "rows": f"{collection}__{table}.{build}.ids.parquet"}


def remove_unreferenced(db_dir: Path, collection: str, *, older_than: float = 600.0) -> list[Path]:
    """Delete the index and ids files of ``collection`` that no sidecar names (a build killed before its
    sidecar was written), once older than ``older_than`` seconds (a build in progress is younger). Call it
    as the collection's writer."""
    folder = Path(db_dir) / "_faiss"
    keep = set()
    for table in ("images", "captions"):
        try:
            sidecar = json.loads((folder / f"{collection}__{table}.json").read_text())
        except (OSError, ValueError):
            continue
        keep.update(str(p) for k, p in _paths(Path(db_dir), collection, table, sidecar).items() if k != "sidecar")
    removed = []
    now = time.time()
    for f in folder.glob(f"{collection}__*"):
        if f.suffix == ".json" or str(f) in keep:
            continue
        try:
            if now - f.stat().st_mtime > older_than:
                f.unlink()
                removed.append(f)
        except OSError:
            continue
    return removed


DISPLAY = {"images": ["id", "path"], "captions": ["id", "image_id", "text"]}


def build_for(collection, table: str, *, config: IndexConfig = IndexConfig()) -> LoadedIndex:
    """Build and persist the FAISS index of one table of ``collection`` from its current LanceDB version."""
    import faiss

    t0 = time.perf_counter()
    version = collection.versions()[table]
    fingerprint = collection.fingerprint(table)
    vectors, rows = collection.vectors(table, DISPLAY[table])
    if table == "captions" and rows.num_rows:  # a killed run may leave captions whose image never landed
        import pyarrow.compute as pc

        keep = pc.is_in(rows["image_id"], value_set=pa.array(collection.ids("images"), pa.string()))
        if not pc.all(keep).as_py():
            mask = keep.to_numpy(zero_copy_only=False)
            vectors, rows = vectors[mask], rows.filter(keep)
    if len(vectors) == 0:
        index, factory = faiss.IndexFlatIP(collection.encoder_info().embed_dim), "Flat"
    else:
        index, factory = build_faiss(vectors, config=config)
    recall = 1.0 if factory == "Flat" else recall_vs_exact(index, vectors, sample=config.recall_sample)
    sidecar = {"table": f"{collection.name}__{table}", "lance_version": version, "fingerprint": fingerprint,
               "rows": int(len(vectors)),
               "factory": factory, "nprobe": config.nprobe if factory != "Flat" else None,
               "recall_at_10_vs_exact": recall, "build_seconds": round(time.perf_counter() - t0, 3),
               "config": asdict(config)}
    _save(collection, table, index, rows, sidecar)
    logger.info("built %s index of %s (%d vectors, recall@10 vs exact %.3f) in %.1f s", factory,
                sidecar["table"], len(vectors), recall, sidecar["build_seconds"])
    return LoadedIndex(to_gpu(index, use_gpu=config.use_gpu), rows, sidecar)


_UNSAVED: set[str] = set()  # folders already reported as unwritable (said once per process)


def _save(collection, table: str, index, rows: pa.Table, sidecar: dict) -> None:
    """Persist an index, its rows and its sidecar (with both files' checksums, the sidecar last). A folder
    that cannot be written (a read-only database) is said once; the index then lives in memory."""
    import faiss

    db_dir = collection.database.path
    sidecar["files"] = _build_files(collection.name, table)
    paths = _paths(db_dir, collection.name, table, sidecar)
    try:
        previous = json.loads(paths["sidecar"].read_text())
    except (OSError, ValueError):
        previous = None
    try:
        atomic_write(paths["rows"], lambda p: pq.write_table(rows, p))
        atomic_write(paths["index"], lambda p: faiss.write_index(index, str(p)))
        sidecar["checksums"] = {"index": hash_file(paths["index"]), "rows": hash_file(paths["rows"])}
        atomic_write(paths["sidecar"], lambda p: p.write_text(json.dumps(sidecar, indent=1)))
        if previous is not None:  # the files of the build this one replaces (a reader that still opens them rebuilds)
            for key in ("index", "rows"):
                old = _paths(db_dir, collection.name, table, previous)[key]
                if old != paths[key]:
                    old.unlink(missing_ok=True)
    except OSError as e:
        folder = str(paths["index"].parent)
        if folder not in _UNSAVED:
            _UNSAVED.add(folder)
            logger.warning("cannot save FAISS indexes in %s (%s): searching with indexes built in memory for this "
                           "process (index into a writable --db to keep them)", folder, e.strerror or e)


def _read_checked(path: Path, want: str | None, what: str) -> bytes:
    """The bytes of ``path``; a CorruptStoreError naming it if they differ from the checksum ``want``."""
    from clipdex.exceptions import CorruptStoreError

    data = path.read_bytes()
    if want is not None and content_hash(data) != want:
        raise CorruptStoreError(f"{path}: the {what} differs from its checksum (damaged)")
    return data


def _read_files(paths: dict[str, Path], sidecar: dict):
    """(index, rows) read from disk, each file checked against the sidecar's checksums; a StoreError
    naming the file that is missing, damaged or unreadable."""
    import faiss

    sums = sidecar.get("checksums") or {}
    data = _read_checked(paths["index"], sums.get("index"), "FAISS index")
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        raise StoreError(f"{paths['index']}: not a readable FAISS index ({str(e).splitlines()[0]})") from e
    data = _read_checked(paths["rows"], sums.get("rows"), "FAISS row ids file")
    try:
        rows = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as e:
        raise StoreError(f"{paths['rows']}: not a readable ids file ({e})") from e
    if not (index.ntotal == rows.num_rows == sidecar["rows"]):  # files from two different builds
        raise StoreError(f"{paths['index']} ({index.ntotal} vectors) and {paths['rows'].name} ({rows.num_rows} rows) "
                         f"do not match their sidecar ({sidecar['rows']} rows)")
    return index, rows


def check_index_files(collection, table: str) -> tuple[str | None, str | None]:
    """For ``clipdex check``: (a problem, a note) about the persisted FAISS index of ``table``; a missing or
    stale index is only a note (search rebuilds it)."""
    paths = _paths(collection.database.path, collection.name, table)
    try:
        sidecar = json.loads(paths["sidecar"].read_text())
    except OSError:
        return None, f"no FAISS index of {collection.name}/{table} saved (search builds it)"
    except ValueError as e:
        return f"{paths['sidecar']}: not valid JSON ({e})", None
    paths = _paths(collection.database.path, collection.name, table, sidecar)
    if not sidecar.get("checksums"):
        return None, f"{paths['sidecar']}: no checksums (built by an older clipdex; the next run rebuilds it)"
    try:
        _read_files(paths, sidecar)
    except OSError as e:
        return f"{e.filename or paths['index']}: cannot be read ({e.strerror or e})", None
    except StoreError as e:
        return str(e), None
    if not is_fresh(collection, table, sidecar):
        return None, f"the FAISS index of {collection.name}/{table} is stale (search or index rebuilds it)"
    return None, None


def load_for(collection, table: str, *, config: IndexConfig = IndexConfig(), rebuild_stale: bool = True) -> LoadedIndex:
    """The persisted index of a table if it covers the table's current version, else a fresh build."""

    paths = _paths(collection.database.path, collection.name, table)
    try:
        sidecar = json.loads(paths["sidecar"].read_text())
        fresh = is_fresh(collection, table, sidecar, config=config)
        paths = _paths(collection.database.path, collection.name, table, sidecar)
    except (OSError, ValueError, KeyError):
        sidecar, fresh = None, False
    if fresh and not sidecar.get("checksums"):
        fresh = False  # built by a clipdex that recorded no checksums: rebuild once, with them
    if not fresh:
        if not rebuild_stale:
            raise StoreError(f"the FAISS index of {collection.name}/{table} is missing or stale")
        if sidecar is not None:
            logger.info("FAISS index of %s/%s is stale (covers version %s); rebuilding", collection.name, table,
                        sidecar.get("lance_version"))
        return build_for(collection, table, config=config)
    try:
        index, rows = _read_files(paths, sidecar)
    except OSError as e:
        logger.warning("could not read %s (%s); rebuilding it from LanceDB", e.filename or paths["index"],
                       e.strerror or e)
        return build_for(collection, table, config=config)
    except StoreError as e:
        logger.warning("%s; rebuilding it from LanceDB", e)
        return build_for(collection, table, config=config)
    _set_nprobe(index, config.nprobe)
    return LoadedIndex(to_gpu(index, use_gpu=config.use_gpu), rows, sidecar)


def is_fresh(collection, table: str, sidecar: dict, *, config: IndexConfig = IndexConfig()) -> bool:
    """Whether an index built as ``sidecar`` says still covers the table exactly, built as ``config`` asks."""
    rows = sidecar["rows"]  # the dimension only where it sets the factory (reading it costs ~0.5 ms a check)
    dim = collection.encoder_info().embed_dim if rows > config.compressed_threshold and config.needs_dim else None
    return (sidecar.get("fingerprint") == collection.fingerprint(table)
            and rows == collection.count(table)
            and sidecar["factory"] == config.factory_for(rows, dim=dim))
