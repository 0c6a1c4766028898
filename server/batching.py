"""Concurrent text queries embedded together: the server's micro-batcher.

A text search's cost is one text-tower pass; eight of them in one batch cost little more than one (the
tower is small and the batch short), so eight clients waiting on one lock each would wait for seven passes
while a batch waits for one. Each request puts its text in a queue and waits; one worker thread takes
everything queued (up to ``max_batch``, grouped by encoder), embeds each group in one pass under the
server's model lock, and hands every request its vector. Nothing waits on a timer: a query that arrives
while the tower is busy joins the next batch, one that arrives at an idle server runs at once.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import numpy as np


class TextBatcher:
    """``embed(encoder, text)`` -> the (D,) normalised embedding, computed in a batch with whatever other
    texts were queued meanwhile."""

    def __init__(self, *, lock: threading.Lock, max_batch: int = 64):
        self.lock, self.max_batch = lock, max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="clipdex-text-batcher", daemon=True)
        self._worker.start()
        self.batches = 0  # batches run and texts embedded (the load benchmark reports the mean batch)
        self.texts = 0

    def embed(self, encoder, text: str) -> np.ndarray:
        """The embedding of ``text`` by ``encoder`` (blocks until its batch ran; its errors are raised here)."""
        done: Future = Future()
        self._queue.put((encoder, text, done))
        return done.result()

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < self.max_batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            groups: dict[int, list] = {}
            for item in items:
                groups.setdefault(id(item[0]), []).append(item)
            for group in groups.values():
                encoder = group[0][0]
                try:
                    with self.lock:
                        vectors = encoder.encode_texts([t for _, t, _ in group])
                except BaseException as e:  # noqa: BLE001 - every waiting request gets the error
                    for _, _, done in group:
                        done.set_exception(e)
                    continue
                self.batches += 1
                self.texts += len(group)
                for (_, _, done), v in zip(group, vectors):
                    done.set_result(v)
