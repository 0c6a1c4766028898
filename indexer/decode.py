"""Decode stage: file bytes -> content hash, size and a preprocessed tensor, in worker processes.

A file that cannot be decoded (corrupt, truncated, not an image, a decompression bomb) comes back as an
error with its reason instead of a tensor; the batch goes on without it.
"""

from __future__ import annotations

import errno
import itertools
import logging
import multiprocessing as mp_context
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from clipdex.files import content_hash
from clipdex.indexer.reader import SourceItem
from clipdex.retrieval.models.images import DEFAULT_MAX_PIXELS, decode_image

logger = logging.getLogger(__name__)



class _LinkRefused(OSError):
    """The file to decode is a symbolic link and the run does not follow links."""


def _open(path: str, *, follow_links: bool):
    """``path`` opened for reading; without ``follow_links``, with O_NOFOLLOW (a link, even one swapped in
    after the listing was checked, is refused, never read)."""
    if follow_links:
        return open(path, "rb")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _LinkRefused(str(e)) from e
        raise
    return os.fdopen(fd, "rb")


class DecodeItems(torch.utils.data.Dataset):
    """Items -> dict(pos, pixels or None, hash, width, height, error, seconds)."""

    def __init__(self, items: Sequence[SourceItem], transform: Callable, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: int | None = None, follow_links: bool = True):
        self.items = list(items)
        self.follow_links = follow_links  # False: a file that is (or became) a symbolic link is refused
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, pos: int) -> dict:
        t0 = time.perf_counter()
        item = self.items[pos]
        out = {"pos": pos, "pixels": None, "hash": "", "width": 0, "height": 0, "error": None}
        try:
            with _open(item.path, follow_links=self.follow_links) as f:
                data = f.read()
            out["hash"] = content_hash(data)
            im, out["width"], out["height"] = decode_image(data, max_pixels=self.max_pixels,
                                                           draft_size=self.draft_size)
            out["pixels"] = self.transform(im)
        except Image.DecompressionBombError as e:
            out["error"] = f"decompression bomb: {e}"
        except FileNotFoundError:
            out["error"] = "file not found (deleted while indexing?)"
        except _LinkRefused:
            out["error"] = "a symbolic link (this run does not follow links)"
        except Image.UnidentifiedImageError:
            out["error"] = "not an image (unidentified format)"
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            out["error"] = f"cannot decode: {e}"
        except Exception as e:  # noqa: BLE001 - one bad file must never stop the run
            out["error"] = f"cannot decode ({type(e).__name__}): {e}"
        out["seconds"] = time.perf_counter() - t0
        return out


def collate(samples: list[dict]) -> dict:
    """Stack the decoded tensors of a batch; keep the failures aside."""
    ok = [s for s in samples if s["error"] is None]
    return {
        "pos": [s["pos"] for s in ok],
        "pixels": torch.stack([s["pixels"] for s in ok]) if ok else None,
        "hash": [s["hash"] for s in ok],
        "width": [s["width"] for s in ok],
        "height": [s["height"] for s in ok],
        "errors": [(s["pos"], s["error"]) for s in samples if s["error"] is not None],
        "decode_seconds": sum(s["seconds"] for s in samples),
        "count": len(samples),
    }


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent dies (the indexer, or the forkserver, which exits with
    the indexer): a killed indexer leaves no decoder behind. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        logger.debug("prctl(PR_SET_PDEATHSIG) unavailable: workers may outlive a killed indexer")
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _init_worker() -> None:
    _die_with_parent()
    torch.set_num_threads(1)  # decoding workers should not fight the encoder for cores
    import open_clip  # noqa: F401 - the transforms unpickle from it: import it while the parent loads the model


def _decode_chunk(items: list[SourceItem], start: int, transform: Callable, max_pixels: int,
                  draft_size: int | None, follow_links: bool = True) -> dict:
    ds = DecodeItems(items, transform, max_pixels=max_pixels, draft_size=draft_size, follow_links=follow_links)
    batch = collate([ds[i] for i in range(len(items))])
    batch["pos"] = [start + p for p in batch["pos"]]
    batch["errors"] = [(start + p, r) for p, r in batch["errors"]]
    return batch


class DecodePool:
    """Decoding processes, started before the model loads and the store opens, so they are ready (and
    forked from a small process) when the first batch is wanted. A batch that takes longer than
    ``timeout`` seconds per file is retried file by file in a fresh pool, so one file that hangs the decoder is
    reported as failed instead of stopping the run.
    """

    def __init__(self, workers: int, *, timeout: float = 10.0):
        import torch.multiprocessing as mp  # tensors travel through shared memory

        self.workers = workers
        self.timeout = timeout
        self._mp = mp
        self.pool = self._start() if workers else None

    def _start(self):
        # fork is instant, but LanceDB's runtime threads do not survive it: fork only before LanceDB loads
        method = "forkserver" if "lancedb" in sys.modules else "fork"
        ctx = self._mp.get_context(method)
        if method == "forkserver":  # the server imports these once; each worker forks from it ready to decode
            ctx.set_forkserver_preload(["clipdex.indexer.decode", "open_clip"])
        return ctx.Pool(self.workers, initializer=_init_worker)

    def close(self) -> None:
        """Stop the worker processes."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def batches(self, items: Sequence[SourceItem], transform: Callable, *, batch_size: int,
                max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None, prefetch: int = 2,
                follow_links: bool = True):
        """Yield collated batches of ``items`` in order (decoded in this process when there are no workers);
        ``follow_links=False`` refuses files that are symbolic links when opened."""
        items = list(items)
        starts = range(0, len(items), batch_size)
        if self.pool is None:
            for a in starts:
                yield _decode_chunk(items[a:a + batch_size], a, transform, max_pixels, draft_size, follow_links)
            return
        args = lambda a, n=batch_size: (items[a:a + n], a, transform, max_pixels, draft_size, follow_links)  # noqa: E731
        pending: deque = deque()
        todo = iter(starts)
        for a in itertools.islice(todo, self.workers * prefetch):
            pending.append((a, self.pool.apply_async(_decode_chunk, args(a))))
        while pending:
            a, result = pending.popleft()
            try:
                yield result.get(timeout=self.timeout * batch_size + 30)
            except mp_context.TimeoutError:
                yield self._one_by_one(items[a:a + batch_size], a, args)
                pending = deque((b, self.pool.apply_async(_decode_chunk, args(b))) for b, _ in pending)
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, self.pool.apply_async(_decode_chunk, args(nxt))))

    def _one_by_one(self, chunk: list[SourceItem], start: int, args) -> dict:
        """After a timeout: a fresh pool, each file of the batch alone; a file that still hangs fails."""
        logger.warning("decoding a batch of %d files timed out; retrying them one by one", len(chunk))
        self.close()
        self.pool = self._start()
        parts = []
        for k in range(len(chunk)):
            try:
                parts.append(self.pool.apply_async(_decode_chunk, args(start + k, 1)).get(timeout=self.timeout + 30))
            except mp_context.TimeoutError:
                parts.append({"pos": [], "pixels": None, "hash": [], "width": [], "height": [], "count": 1,
                              "errors": [(start + k, f"decoding took over {self.timeout:.0f} s (skipped)")],
                              "decode_seconds": self.timeout})
                self.close()
                self.pool = self._start()
        ok = [p for p in parts if p["pixels"] is not None]
        return {"pos": [i for p in ok for i in p["pos"]],
                "pixels": torch.cat([p["pixels"] for p in ok]) if ok else None,
                "hash": [h for p in ok for h in p["hash"]], "width": [w for p in ok for w in p["width"]],
                "height": [h for p in ok for h in p["height"]], "errors": [e for p in parts for e in p["errors"]],
                "decode_seconds": sum(p["decode_seconds"] for p in parts), "count": len(chunk)}
