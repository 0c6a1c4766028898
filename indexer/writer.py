"""Write stage: buffer embedded rows and append them to the collection in large batches."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from clipdex.indexer.reader import SourceItem
from clipdex.retrieval.store.record import Collection


def _vectors(rows: list[np.ndarray], dim: int) -> pa.FixedSizeListArray:
    flat = np.concatenate(rows).astype(np.float32).reshape(-1) if rows else np.zeros(0, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)


class StoreWriter:
    """Collects image rows (and their caption rows) and appends them every ``flush_rows`` images."""

    def __init__(self, collection: Collection, *, source: str, flush_rows: int = 4096,
                 replace: set[str] | None = None):
        self.collection = collection
        self.replace = replace or set()  # ids whose old rows are swapped out when their new rows are written
        self.source = source
        self.flush_rows = flush_rows
        self.dim = collection.encoder_info().embed_dim
        self.seconds = 0.0
        self.written = 0
        self._img: list[dict] = []
        self._img_vec: list[np.ndarray] = []
        self._cap: list[dict] = []
        self._cap_vec: list[np.ndarray] = []

    def add(self, item: SourceItem, *, content_hash: str, width: int, height: int, vector: np.ndarray,
            caption_vectors: np.ndarray) -> None:
        """Buffer one image row and its caption rows; flush when the buffer is full."""
        self._img.append({"id": item.id, "path": item.path, "source": self.source, "content_hash": content_hash,
                          "size": item.size, "mtime": item.mtime, "width": width, "height": height,
                          "captions": list(item.captions)})
        self._img_vec.append(vector[None])
        for k, text in enumerate(item.captions):
            self._cap.append({"id": f"{item.id}#{k}", "image_id": item.id, "text": text})
        if len(item.captions):
            self._cap_vec.append(caption_vectors)
        if len(self._img) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered: old rows of changed files out, then captions, then images (the commit point)."""
        if not self._img:
            return
        t0 = time.perf_counter()
        images = pa.Table.from_pylist(self._img).append_column("vector", _vectors(self._img_vec, self.dim))
        captions = None
        if self._cap:
            captions = pa.Table.from_pylist(self._cap).append_column("vector", _vectors(self._cap_vec, self.dim))
        self.collection.replace([r["id"] for r in self._img if r["id"] in self.replace], images, captions)
        self.written += len(self._img)
        self._img, self._img_vec, self._cap, self._cap_vec = [], [], [], []
        self.seconds += time.perf_counter() - t0
