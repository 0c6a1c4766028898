"""The system of record: a LanceDB database folder holding named collections of images and captions.

Each collection is two LanceDB tables, ``<name>__images`` and ``<name>__captions``, whose schemas, recorded
encoder and patch-token grid layout are described in :mod:`clipdex.retrieval.store.schema`: an append or a
query with another encoder is refused rather than returning nonsense. FAISS indexes
(:mod:`clipdex.retrieval.store.faiss_index`) are accelerators built from these tables; the tables are always
the truth. This is the only module that calls LanceDB, and Lance (the format under it: a query reads the
tables' heads through it, which imports in a fifth of LanceDB's time; the Ray engine's workers write data files
with :func:`write_fragments`, the run commits them with :meth:`Collection.commit_fragments`).

Crash safety: captions are appended before the images they belong to and deleted after them, so the
images table is the commit point. :meth:`Collection.reconcile` drops captions whose image row is absent,
which is all a run killed at any moment can leave behind.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from clipdex.exceptions import CorruptStoreError, ModelMismatchError, StoreError
from clipdex.retrieval.store.filters import IN_LIST, chunks, filter_errors, sql_in, sql_quote
from clipdex.retrieval.store.schema import (
    ENCODER_KEY,
    GRID_KEY,
    IMAGE_PRECISION_KEY,
    TABLES,
    ExistingRow,
    captions_schema,
    check_grid_layout,
    check_name,
    grid_bytes,
    images_schema,
)

if TYPE_CHECKING:
    from clipdex.retrieval.models.info import EncoderInfo

logger = logging.getLogger(__name__)

# Lance warns at every fork once it is loaded. clipdex's forked children (decoding workers, world rendering, data
# loaders) never touch Lance, so the warning would only alarm: it is silenced for the whole process.
warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)

DEFAULT_DB = "clipdex-data/db"
DEFAULT_COLLECTION = "default"
_REWRITTEN_FILES = frozenset({"latest_version_hint.json", "_latest.manifest"})  # LanceDB's mutable files


class Database:
    """A LanceDB database folder with any number of named collections."""

    def __init__(self, path: str | Path, *, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_dir():
            raise StoreError(f"no database at {self.path} (index something into it first: clipdex index ... "
                             f"--db {self.path})")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the database folder {self.path}: {e}") from e
        self._db = None

    @property
    def db(self):
        """The LanceDB connection, made on first use: a query that the FAISS accelerator answers reads only the
        tables' heads (:meth:`Collection.encoder_info`, :meth:`Collection.fingerprint`), through Lance, and never
        pays for importing LanceDB (1 s of a cold search)."""
        if self._db is None:
            import lancedb

            # every read sees the latest commit: a long-lived reader (the app) never reads a version that a
            # writer's cleanup has since deleted, and never misses another process's writes
            self._db = lancedb.connect(str(self.path), read_consistency_interval=timedelta(0))
        return self._db

    def collections(self) -> list[str]:
        """Names of the collections in this database."""
        return sorted(n[: -len("__images")] for n in _table_names(self.path) if n.endswith("__images"))

    def open(self, name: str = DEFAULT_COLLECTION) -> "Collection":
        """An existing collection; the error lists the ones there are."""
        check_name(name)
        if name not in self.collections():
            have = ", ".join(self.collections()) or "none"
            raise StoreError(f"no collection {name!r} in {self.path} (collections: {have})")
        return Collection(self, name)

    def open_or_create(self, name: str, *, info: "EncoderInfo", grid: dict | None = None,
                       image_precision: str = "fp32") -> "Collection":
        """Open ``name``, refusing another encoder (or image precision), or create it for ``info``; ``grid`` (a
        layout, see :func:`check_grid_layout`): a new collection stores each image's patch-token grid too. An
        existing collection keeps the columns it was made with (one made without grids stays without)."""
        check_name(name)
        if name in self.collections():
            col = Collection(self, name)
            col.check_encoder(info, action="append to", image_precision=image_precision)
            return col
        self.db.create_table(f"{name}__captions", schema=captions_schema(info), exist_ok=True)
        self.db.create_table(f"{name}__images", schema=images_schema(info, grid=grid, image_precision=image_precision),
                             exist_ok=True)
        return Collection(self, name)


def _table_names(folder: Path) -> list[str]:
    """The tables of a database folder, as LanceDB lists a local one: its ``NAME.lance`` folders."""
    try:
        return [p.name[: -len(".lance")] for p in folder.iterdir() if p.name.endswith(".lance") and p.is_dir()]
    except OSError as e:
        raise StoreError(f"cannot list the database folder {folder}: {e}") from e


class Collection:
    """One collection: its images table, its captions table and the encoder recorded with them.

    The LanceDB table handles are private: every query of the collection is a method here, so that this
    module stays the only one that speaks LanceDB.
    """

    def __init__(self, database: Database, name: str):
        self.database = database
        self.name = name
        self._tables: dict = {}  # LanceDB handles, opened on first use
        if not self.table_folder("captions").is_dir():  # a collection made before captions had their own table
            database.db.create_table(f"{name}__captions", schema=captions_schema(self.encoder_info()))

    def table_folder(self, table: str) -> Path:
        """The folder LanceDB keeps ``table`` ('images' or 'captions') in."""
        if table not in TABLES:
            raise StoreError(f"unknown table {table!r} of collection {self.name!r}: use one of {', '.join(TABLES)}")
        return self.database.path / f"{self.name}__{table}.lance"

    @property
    def _images(self):
        return self._table("images")

    @property
    def _captions(self):
        return self._table("captions")

    def _head(self, table: str):
        """The latest version of ``table`` opened with Lance (the format under LanceDB), for what a query reads
        before any row: schema metadata, version, row count. Lance imports in a fifth of LanceDB's time."""
        import lance

        folder = self.table_folder(table)
        with self._reading(table, "open"):
            return lance.dataset(str(folder))

    @contextmanager
    def _reading(self, table: str, what: str) -> Iterator[None]:
        """LanceDB's errors while reading ``table`` (a RuntimeError that names no file) as a StoreError that
        names the table's folder and what to do."""
        try:
            yield
        except StoreError:
            raise
        except (OSError, RuntimeError, ValueError, pa.ArrowException) as e:
            raise CorruptStoreError(
                f"LanceDB could not {what} table {self.name}__{table} ({self.table_folder(table)}): {e}. The data "
                f"may be damaged: run clipdex check --db {self.database.path} --collection {self.name} to find the "
                "file, then re-index the collection") from e

    def _table(self, table: str):
        handle = self._tables.get(table)
        if handle is None:
            self.table_folder(table)  # refuses an unknown table by name
            handle = self._tables[table] = self.database.db.open_table(f"{self.name}__{table}")
        return handle

    def encoder_info(self) -> "EncoderInfo":
        """The encoder recorded in the images table's schema metadata."""
        meta = self._head("images").schema.metadata or {}
        if ENCODER_KEY not in meta:
            raise StoreError(f"{self.database.path}/{self.name}: not a clipdex collection (no encoder recorded)")
        from clipdex.retrieval.models.info import EncoderInfo

        d = json.loads(meta[ENCODER_KEY])
        return EncoderInfo(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def image_precision(self) -> str:
        """The precision of the image tower that embedded the images: fp32 or int8 (see schema.IMAGE_PRECISION_KEY)."""
        meta = self._head("images").schema.metadata or {}
        return meta.get(IMAGE_PRECISION_KEY, b"fp32").decode()

    def check_encoder(self, info: "EncoderInfo", *, action: str = "query", image_precision: str | None = None) -> None:
        """Refuse ``info`` unless it is the encoder that filled this collection; with ``image_precision`` (an
        append), refuse an image tower of another precision too: int8 and fp32 vectors are not mixed."""
        if image_precision is not None and image_precision != self.image_precision():
            raise ModelMismatchError(
                f"cannot {action} collection {self.name!r} with {image_precision} image embeddings: its images were "
                f"embedded by a {self.image_precision()} image tower, and the two are not mixed in one collection. "
                f"Use --precision {'int8' if self.image_precision() == 'int8' else 'auto'} or another --collection.")
        have = self.encoder_info()
        given = info.as_dict()
        diff = {k: (v, given[k]) for k, v in have.as_dict().items()
                if v != given[k] and not (k == "weights" and not v)}  # older stores recorded no fingerprint
        if diff:
            detail = "; ".join(f"{k}: collection has {a!r}, given {b!r}" for k, (a, b) in diff.items())
            if set(diff) == {"weights"}:
                detail += " (same name, other weights: was the checkpoint retrained or replaced?)"
            raise ModelMismatchError(
                f"cannot {action} collection {self.name!r} with model {info.spec!r}: it was indexed with "
                f"{have.spec!r} ({detail}). Use --model {have.spec} or another --collection.")

    def grid_layout(self) -> dict | None:
        """The layout of the images' patch-token grids (side, cells, width, dtype), or None when the
        collection stores none (made without them, or before clipdex stored them)."""
        schema = self._head("images").schema
        meta = schema.metadata or {}
        if GRID_KEY not in meta or "grid" not in schema.names:
            return None
        try:
            return check_grid_layout(json.loads(meta[GRID_KEY]))
        except (ValueError, StoreError) as e:
            raise CorruptStoreError(f"{self.table_folder('images')}: unreadable grid layout in the schema "
                                    f"metadata ({e}); re-index the collection") from e

    def grids(self, ids: list[str]) -> np.ndarray:
        """The patch-token grids of these images, in the order asked: (K, cells, width) float16. Raises
        :class:`StoreError` when the collection stores no grids or an id is not in it."""
        layout = self.grid_layout()
        if layout is None:
            raise StoreError(f"collection {self.name!r} stores no patch-token grids (indexed without them, or by an "
                             "older clipdex): re-index it into a new collection to store them")
        ids = list(ids)
        shape = (layout["cells"], layout["width"])
        if not ids:
            return np.zeros((0, *shape), np.float16)
        t = self.rows(sorted(set(ids)), columns=("id", "grid"))
        by_id = dict(zip(t["id"].to_pylist(), t["grid"].to_pylist()))
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise StoreError(f"{len(missing)} of the {len(ids)} images asked for are not in collection "
                             f"{self.name!r} (e.g. {missing[0]!r}): no grid to read")
        want = grid_bytes(layout)
        bad = [i for i in ids if by_id[i] is None or len(by_id[i]) != want]
        if bad:
            raise CorruptStoreError(
                f"image {bad[0]!r} of collection {self.name!r} has a grid of "
                f"{'no' if by_id[bad[0]] is None else len(by_id[bad[0]])} bytes, not {want}: the data is damaged. "
                f"Run clipdex check --db {self.database.path} --collection {self.name}")
        out = np.empty((len(ids), *shape), np.float16)
        for k, i in enumerate(ids):
            out[k] = np.frombuffer(by_id[i], dtype=np.float16).reshape(shape)
        return out

    def count(self, table: str = "images") -> int:
        """Number of rows of ``table`` ('images' or 'captions')."""
        head = self._head(table)
        with self._reading(table, "count the rows of"):
            return head.count_rows()

    def caption_count(self) -> int:
        """Number of captions."""
        return self.count("captions")

    def ids(self, table: str = "images", *, where: str | None = None) -> list[str]:
        """Ids of the rows of ``table``: all of them, or those matching ``where`` (SQL over the table's
        columns; for images, :data:`FILTER_COLUMNS`)."""
        t = self._table(table)

        def run() -> pa.Table:
            query = t.search().where(where) if where else t.search()
            return query.select(["id"]).limit(None).to_arrow()

        with self._reading(table, "read the ids of"):
            return filter_errors(where, run)["id"].to_pylist()

    def rows(self, ids: list[str] | None = None, *, columns: tuple[str, ...] | list[str],
             table: str = "images") -> pa.Table:
        """``columns`` of the rows of ``table`` with these ids (every row when ``ids`` is None), in no
        particular order; ids not in the table are left out. Include ``id`` to match rows to ids."""
        t, cols = self._table(table), list(columns)
        with self._reading(table, "read rows of"):
            if ids is None:
                return t.search().select(cols).limit(None).to_arrow()
            parts = [t.search().where(sql_in("id", chunk)).select(cols).limit(None).to_arrow()
                     for chunk in chunks(list(ids), IN_LIST)]
            return pa.concat_tables(parts) if parts else pa.schema([t.schema.field(c) for c in cols]).empty_table()

    def sources(self) -> list[str]:
        """The folders and manifests (with ``#split=``) the images were indexed from, sorted."""
        import pyarrow.compute as pc

        return sorted(pc.unique(self.rows(columns=["source"])["source"]).to_pylist())

    def nearest(self, table: str, vector: np.ndarray, *, k: int, where: str | None = None,
                columns: tuple[str, ...] | list[str] = ("id",)) -> pa.Table:
        """The ``k`` rows of ``table`` nearest to ``vector`` by inner product (cosine, on L2-normalised
        vectors), best first: ``columns`` and a float64 ``score``. ``where`` (SQL over
        :data:`FILTER_COLUMNS` of the images) is applied before the search, so k rows come back whenever k
        match; for captions it selects the images whose captions are searched. Exact (clipdex builds no
        LanceDB vector index): the FAISS accelerator is the fast path."""
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        t, cols, prefilter = self._table(table), list(columns), where
        if table == "captions" and where:
            owners = self.ids("images", where=where)
            if not owners:
                return pa.schema([*(t.schema.field(c) for c in cols), pa.field("score", pa.float64())]).empty_table()
            prefilter = sql_in("image_id", owners)

        def run() -> pa.Table:
            query = t.search(vector).distance_type("dot")
            if prefilter:
                query = query.where(prefilter, prefilter=True)
            return query.select([*cols, "_distance"]).limit(k).to_arrow()

        with self._reading(table, "search"):
            found = filter_errors(where, run)
        score = [1.0 - d for d in found["_distance"].to_pylist()]  # LanceDB's dot distance is 1 - similarity
        return found.select(cols).append_column(pa.field("score", pa.float64()), pa.array(score, pa.float64()))

    def existing(self, source: str) -> dict[str, ExistingRow]:
        """Rows indexed from ``source``, by id."""
        cols = ["id", "path", "content_hash", "size", "mtime", "captions"]
        with self._reading("images", "read the indexed files of"):
            t = self._images.search().where(f"source = {sql_quote(source)}").select(cols).limit(None).to_arrow()
        return {i: ExistingRow(i, p, h, s, m, tuple(c or ())) for i, p, h, s, m, c in
                zip(*(t[c].to_pylist() for c in cols))}

    def touch(self, rows: list[tuple[str, float, int]]) -> None:
        """Record new (mtime, size) for files whose content did not change, in one commit."""
        if rows:
            update = pa.table({"id": [r[0] for r in rows], "mtime": [float(r[1]) for r in rows],
                               "size": pa.array([int(r[2]) for r in rows], pa.int64())})
            self._images.merge_insert("id").when_matched_update_all().execute(update)

    def replace(self, ids: list[str], images: pa.Table, captions: pa.Table | None) -> None:
        """Swap in new rows for ``ids``: the old images and captions go, then the new ones are appended
        (a crash in between leaves those files absent, and the next run adds them again)."""
        if ids:
            self.delete_images(ids)
        self.append(images, captions)

    def append(self, images: pa.Table, captions: pa.Table | None) -> None:
        """Append rows: captions first, then their images (the commit point)."""
        try:
            if captions is not None and captions.num_rows:
                self._captions.add(captions.cast(self._captions.schema))
            if images.num_rows:
                self._images.add(images.cast(self._images.schema))
        except (OSError, RuntimeError, ValueError) as e:  # LanceDB reports I/O failures as several types
            raise StoreError(f"could not write to {self.database.path} (disk full?): {e}") from e

    def fragment_targets(self) -> dict[str, tuple[str, pa.Schema]]:
        """Each table's Lance folder and the schema its rows must have, by table: what a distributed writer
        (the Ray engine's workers, which open no database) needs for :func:`write_fragments`."""
        return {t: (str(self.table_folder(t)), self._table(t).schema) for t in TABLES}

    def commit_fragments(self, *, images: list[str], captions: list[str], replace: list[str] = ()) -> None:
        """Add fragments that :func:`write_fragments` wrote (their JSON metadata) to the tables: the old rows of
        ``replace`` ids go first, then one commit adds the caption fragments and one the image fragments (the
        commit point, as in :meth:`append`). Call it only while holding the collection's writer lock."""
        import lance
        from lance.fragment import FragmentMetadata

        if replace:
            self.delete_images(list(replace))
        try:
            for table, frags in (("captions", captions), ("images", images)):
                if not frags:
                    continue
                uri = str(self.table_folder(table))
                version = lance.dataset(uri).version
                lance.LanceDataset.commit(uri, lance.LanceOperation.Append(
                    [FragmentMetadata.from_json(f) for f in frags]), read_version=version)
        except (OSError, RuntimeError, ValueError) as e:  # Lance reports I/O failures as several types
            raise StoreError(f"could not commit to {self.database.path} (disk full?): {e}") from e

    def delete_images(self, ids: list[str]) -> None:
        """Delete images and then their captions."""
        for chunk in chunks(ids, IN_LIST):
            self._images.delete(sql_in("id", chunk))
            self._captions.delete(sql_in("image_id", chunk))

    def reconcile(self) -> int:
        """Drop captions whose image row is absent (what a killed run may leave); returns how many captions."""
        image_ids = set(self.ids("images"))
        owners = self.rows(columns=["image_id"], table="captions")["image_id"].to_pylist()
        orphans = sorted(set(owners) - image_ids)
        for chunk in chunks(orphans, IN_LIST):
            self._captions.delete(sql_in("image_id", chunk))
        return sum(o not in image_ids for o in owners)

    def duplicate_ids(self, table: str = "images") -> dict[str, int]:
        """Ids that more than one row of ``table`` holds, with how many rows hold each."""
        return {i: n for i, n in Counter(self.ids(table)).items() if n > 1}

    def remove_duplicates(self) -> dict[str, int]:
        """Keep one row of every id held by several (what two writers at once made before the writer lock),
        in one commit per table; returns the rows removed, by table."""
        removed = {}
        for table in TABLES:
            dup = self.duplicate_ids(table)
            removed[table] = sum(dup.values()) - len(dup)
            if not dup:
                continue
            t = self._table(table)
            with self._reading(table, "repair duplicate ids in"):
                rows = pa.concat_tables([
                    t.search().where(sql_in("id", chunk)).with_row_id(True).select(["id"]).limit(None).to_arrow()
                    for chunk in chunks(sorted(dup), IN_LIST)])
                seen, extra = set(), []
                for i, rowid in zip(rows["id"].to_pylist(), rows["_rowid"].to_pylist()):
                    if i in seen:
                        extra.append(rowid)
                    seen.add(i)
                for chunk in chunks(extra, 2000):  # a later copy of an id goes, by its row address
                    t.delete(f"_rowid IN ({', '.join(str(r) for r in chunk)})")
        return removed

    def versions(self) -> dict[str, int]:
        """The latest LanceDB version of each table (what a FAISS index records it covers)."""
        return {table: int(self._head(table).version) for table in TABLES}

    def fingerprint(self, table: str) -> str:
        """The latest version of ``table`` and when it was written: a dropped and re-created table that
        reaches the same version number still differs."""
        head = self._head(table)
        with self._reading(table, "list the versions of"):
            v = head.versions()[-1]
        return f"{v['version']}@{v['timestamp'].isoformat()}"

    def vectors(self, table: str, columns: list[str]) -> tuple[np.ndarray, pa.Table]:
        """All vectors of ``table`` ('images' or 'captions') as (N, D) float32 with the asked columns."""
        with self._reading(table, "read the vectors of"):
            t = self._table(table).search().select(["vector", *columns]).limit(None).to_arrow()
        dim = self.encoder_info().embed_dim
        vec = t["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        return np.ascontiguousarray(vec, dtype=np.float32), t.select(columns)

    def compact(self, *, keep_versions_seconds: float = 60.0) -> None:
        """Merge the small fragments many appends leave and delete the versions (and the data files only they
        use) older than ``keep_versions_seconds`` (LanceDB ``optimize``); best effort. Call it only while
        holding the collection's writer lock: files a failed write left are deleted too."""
        for t in (self._images, self._captions):
            try:
                t.optimize(cleanup_older_than=timedelta(seconds=keep_versions_seconds), delete_unverified=True)
            except Exception as e:  # noqa: BLE001 - compaction is an optimisation, never a failure
                logger.warning("could not compact %s: %s", t.name, e)

    def disk_usage(self) -> dict:
        """Bytes on disk, data files and versions kept, per table and in all."""
        out = {"bytes": 0}
        for table in TABLES:
            folder = self.table_folder(table)
            files = [f for f in folder.rglob("*") if f.is_file()]
            size = sum(f.stat().st_size for f in files)
            head = self._head(table)
            with self._reading(table, "list the versions of"):
                versions = len(head.versions())
            out[table] = {"bytes": size, "data_files": sum(f.parent.name == "data" for f in files),
                          "versions": versions}
            out["bytes"] += size
        return out

    def files(self) -> dict[str, list[Path]]:
        """The files of the collection's two LanceDB folders that LanceDB never rewrites (data, deletion
        files, version manifests, transactions), by table: what :mod:`integrity` checksums. The hint of the
        latest version is rewritten by every commit and left out."""
        return {table: sorted(f for f in self.table_folder(table).rglob("*")
                              if f.is_file() and f.name not in _REWRITTEN_FILES) for table in TABLES}

    def scan(self, table: str, columns: list[str], *, batch_rows: int = 65536) -> Iterator[pa.RecordBatch]:
        """Every row of ``table`` in batches (for a full check); read errors come as :class:`CorruptStoreError`."""
        with self._reading(table, "read every row of"):
            yield from self._table(table).search().select(columns).limit(None).to_batches(batch_rows)


def write_fragments(uri: str, schema: pa.Schema, rows: pa.Table) -> list[str]:
    """Write ``rows`` as new data files of the Lance table at ``uri`` (a :meth:`Collection.fragment_targets`
    entry), uncommitted: no reader sees them until :meth:`Collection.commit_fragments` adds them, and files of a
    run that never commits are deleted by the next run's compaction. Returns the fragments' metadata as JSON
    (what travels back to the committer). Runs in any process that can reach ``uri``; opens no database."""
    from lance.fragment import write_fragments as lance_write_fragments

    try:
        frags = lance_write_fragments(rows.cast(schema), uri, schema=schema, mode="append")
    except (OSError, RuntimeError, ValueError) as e:
        raise StoreError(f"could not write data files into {uri} (disk full?): {e}") from e
    return [json.dumps(f.to_json()) for f in frags]
