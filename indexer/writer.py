"""Write stage: buffer embedded rows and commit them to the collection in large batches, and at least every
``flush_seconds``, so that a failure late in a long run keeps all but the last batch's work. A collection that
stores patch-token grids gets each image's grid in the same row (one commit: the row is whole or absent).

:class:`Rows` turns embedded files into the two tables' Arrow rows; the local engine's :class:`StoreWriter`
and the Ray engine's fragment writers (:mod:`clipdex.indexer.ray_engine`) both build their rows with it."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from clipdex.exceptions import StoreError
from clipdex.indexer.reader import SourceItem
from clipdex.retrieval.store.record import Collection


def _vectors(rows: list[np.ndarray], dim: int) -> pa.FixedSizeListArray:
    flat = np.concatenate(rows).astype(np.float32).reshape(-1) if rows else np.zeros(0, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)


class Rows:
    """Image rows (with their grids when the collection stores them) and their caption rows, as added, turned
    into the images and captions tables' Arrow rows by :meth:`tables`.

    dim: the embedding size; grid: the collection's grid layout (None: it stores no grids); source: recorded
    with every image row."""

    def __init__(self, *, source: str, dim: int, grid: dict | None, collection_name: str = ""):
        self.source, self.dim, self.grid, self.collection_name = source, dim, grid, collection_name
        self.images: list[dict] = []
        self._img_vec: list[np.ndarray] = []
        self._img_grid: list[bytes] = []
        self._cap: list[dict] = []
        self._cap_vec: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.images)

    def add(self, item: SourceItem, *, content_hash: str, width: int, height: int, vector: np.ndarray,
            caption_vectors: np.ndarray, grid: np.ndarray | None = None) -> None:
        """One image row and its caption rows. ``grid``: the image's (cells, width) patch-token grid, needed
        when (and only kept when) the collection stores grids."""
        if self.grid is not None:
            self._img_grid.append(self._grid_bytes(item, grid))
        self.images.append({"id": item.id, "path": item.path, "source": self.source, "content_hash": content_hash,
                            "size": item.size, "mtime": item.mtime, "width": width, "height": height,
                            "captions": list(item.captions)})
        self._img_vec.append(np.asarray(vector).reshape(1, -1))
        for k, text in enumerate(item.captions):
            self._cap.append({"id": f"{item.id}#{k}", "image_id": item.id, "text": text})
        if len(item.captions):
            self._cap_vec.append(np.asarray(caption_vectors).reshape(len(item.captions), -1))

    def _grid_bytes(self, item: SourceItem, grid: np.ndarray | None) -> bytes:
        shape = (self.grid["cells"], self.grid["width"])
        if grid is None or tuple(grid.shape) != shape:
            got = "none" if grid is None else "x".join(map(str, grid.shape))
            raise StoreError(f"collection {self.collection_name!r} stores patch-token grids of "
                             f"{shape[0]}x{shape[1]}; the grid given for {item.path} is {got}")
        return np.ascontiguousarray(grid, dtype=np.float16).tobytes()  # cells * width * 2 bytes

    def tables(self) -> tuple[pa.Table, pa.Table | None]:
        """The images rows and the captions rows (None when no image has a caption)."""
        images = pa.Table.from_pylist(self.images).append_column("vector", _vectors(self._img_vec, self.dim))
        if self.grid is not None:  # after the vector: the table's column order
            images = images.append_column("grid", pa.array(self._img_grid, pa.binary()))
        captions = None
        if self._cap:
            captions = pa.Table.from_pylist(self._cap).append_column("vector", _vectors(self._cap_vec, self.dim))
        return images, captions


class StoreWriter:
    """Collects image rows (and their caption rows) and commits them every ``flush_rows`` images or
    ``flush_seconds`` seconds, whichever comes first."""

    def __init__(self, collection: Collection, *, source: str, flush_rows: int = 4096, flush_seconds: float = 30.0,
                 replace: set[str] | None = None):
        self.collection = collection
        self.replace = replace or set()  # ids whose old rows are swapped out when their new rows are written
        self.source = source
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.commits = 0
        self._last_commit = time.monotonic()
        self.dim = collection.encoder_info().embed_dim
        self.grid = collection.grid_layout()  # None: the collection stores no grids
        self.seconds = 0.0
        self.written = 0
        self._rows = self._new_rows()

    def _new_rows(self) -> Rows:
        return Rows(source=self.source, dim=self.dim, grid=self.grid, collection_name=self.collection.name)

    def add(self, item: SourceItem, *, content_hash: str, width: int, height: int, vector: np.ndarray,
            caption_vectors: np.ndarray, grid: np.ndarray | None = None) -> None:
        """Buffer one image row and its caption rows (see :meth:`Rows.add`); flush when the buffer is full."""
        self._rows.add(item, content_hash=content_hash, width=width, height=height, vector=vector,
                       caption_vectors=caption_vectors, grid=grid)
        if len(self._rows) >= self.flush_rows or time.monotonic() - self._last_commit >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered: old rows of changed files out, then captions, then images (the commit point)."""
        if not len(self._rows):
            return
        t0 = time.perf_counter()
        images, captions = self._rows.tables()
        ids = [r["id"] for r in self._rows.images]
        try:
            self.collection.replace([i for i in ids if i in self.replace], images, captions)
        except StoreError as e:
            raise StoreError(
                f"{e}. This run committed {self.written} images before the failure, in {self.commits} commits: they "
                f"are kept. The {len(ids)} images of the batch being written were not; free some space and run "
                "the same command again to index them") from e
        self.written += len(ids)
        self.commits += 1
        self._last_commit = time.monotonic()
        self._rows = self._new_rows()
        self.seconds += time.perf_counter() - t0
