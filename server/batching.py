"""Concurrent text queries embedded together: the server's micro-batcher.

A text search's cost is one text-tower pass; eight of them in one batch cost little more than one (the
tower is small and the batch short), so eight clients waiting on one lock each would wait for seven passes
while a batch waits for one. Each request puts its text in a queue and waits; one worker thread takes
everything queued (up to ``max_batch``, grouped by encoder), embeds each group in one pass under the
server's model lock, and hands every request its vector. Nothing waits on a timer: a query that arrives
while the tower is busy joins the next batch, one that arrives at an idle server runs at once.

A request may also hand over what to do with its vector (``submit(..., then=f)``): the worker runs ``f`` on
it and the request gets ``f``'s result. The server's plain text search does so (the FAISS search and the
response's JSON), so that the request needs no thread of its own: the event loop awaits one future, and a
search costs one thread switch to the worker and one back instead of four.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
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
        return self.submit(encoder, text).result()

    def submit(self, encoder, text: str, *, then: Callable[[np.ndarray], object] | None = None) -> Future:
        """A future of ``text``'s embedding by ``encoder``, or of ``then(embedding)`` run by the worker right
        after the batch (outside the model lock); an error of either is the future's."""
        done: Future = Future()
        self._queue.put((encoder, text, done, then))
        return done

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
                        vectors = encoder.encode_texts([item[1] for item in group])
                except BaseException as e:  # noqa: BLE001 - every waiting request gets the error
                    for item in group:
                        item[2].set_exception(e)
                    continue
                self.batches += 1
                self.texts += len(group)
                for (_, _, done, then), v in zip(group, vectors):
                    _settle(done, then, v)


def _settle(done: Future, then: Callable | None, vector: np.ndarray) -> None:
    """``done`` given ``vector``, or ``then(vector)``, or the error ``then`` raised."""
    if then is None:
        done.set_result(vector)
        return
    try:
        result = then(vector)
    except BaseException as e:  # noqa: BLE001 - the request that asked for ``then`` gets its error
        done.set_exception(e)
    else:
        done.set_result(result)
