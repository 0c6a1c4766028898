"""Decode stage: file bytes -> content hash, size and a preprocessed tensor, in worker processes.

A file that cannot be decoded (corrupt, truncated, not an image, a decompression bomb) comes back as an
error with its reason instead of a tensor; the batch goes on without it. With ``device_jpeg``, a JPEG the device
decoder can take (:func:`jpeg_for_device`) comes back as its bytes, header checked, for
:mod:`clipdex.indexer.device_decode` to decode in batches on the encoder's device.
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
from clipdex.retrieval.models.images import (
    DEFAULT_MAX_PIXELS,
    QUARTER_TURNS,
    decode_image,
    exif_orientation,
    open_header,
)

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


def failure_reason(e: BaseException) -> str:
    """What the run reports for a file whose reading or decoding raised ``e``."""
    if isinstance(e, Image.DecompressionBombError):
        return f"decompression bomb: {e}"
    if isinstance(e, FileNotFoundError):
        return "file not found (deleted while indexing?)"
    if isinstance(e, _LinkRefused):
        return "a symbolic link (this run does not follow links)"
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image (unidentified format)"
    if isinstance(e, (OSError, ValueError, SyntaxError, EOFError)):
        return f"cannot decode: {e}"
    return f"cannot decode ({type(e).__name__}): {e}"


def jpeg_for_device(data: bytes, *, max_pixels: int) -> tuple[int, int, int] | None:
    """(width, height as shown, EXIF orientation) of a JPEG the device decoder is given, from its header alone;
    None for a file the CPU decoder keeps: any other format, an MPO (several pictures), a CMYK/YCCK JPEG (nvJPEG
    and PIL convert them differently), or one that does not end with its end-of-image marker (truncated: PIL
    refuses it, a device decoder might not). Raises what :func:`~clipdex.retrieval.models.images.open_header`
    raises (a decompression bomb, not an image), as the CPU decoder would."""
    im = open_header(data, max_pixels=max_pixels)
    if im.format != "JPEG" or im.mode not in ("RGB", "L") or not data[-64:].rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    w, h = im.size
    orientation = exif_orientation(im)
    return (h, w, orientation) if orientation in QUARTER_TURNS else (w, h, orientation)


class DecodeItems(torch.utils.data.Dataset):
    """Items -> dict(pos, pixels or None, hash, width, height, error, seconds); with ``device_jpeg``, a JPEG that
    :func:`jpeg_for_device` accepts comes back undecoded, as ``jpeg`` (its bytes) and ``orientation``."""

    def __init__(self, items: Sequence[SourceItem], transform: Callable, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: int | None = None, follow_links: bool = True, device_jpeg: bool = False):
        self.items = list(items)
        self.follow_links = follow_links  # False: a file that is (or became) a symbolic link is refused
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        self.device_jpeg = device_jpeg

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
            header = jpeg_for_device(data, max_pixels=self.max_pixels) if self.device_jpeg else None
            if header is not None:
                out["width"], out["height"], out["orientation"] = header
                out["jpeg"] = data
            else:
                im, out["width"], out["height"] = decode_image(data, max_pixels=self.max_pixels,
                                                               draft_size=self.draft_size)
                out["pixels"] = self.transform(im)
        except Exception as e:  # noqa: BLE001 - one bad file must never stop the run
            out["error"] = failure_reason(e)
        out["seconds"] = time.perf_counter() - t0
        return out


def collate(samples: list[dict]) -> dict:
    """Stack the decoded tensors of a batch; keep the failures aside, and the JPEGs left for the device decoder
    under ``jpegs`` (their bytes in one tensor, cut by ``sizes``; None when there are none)."""
    ok = [s for s in samples if s["error"] is None and s.get("jpeg") is None]
    jpegs = [s for s in samples if s["error"] is None and s.get("jpeg") is not None]
    return {
        "pos": [s["pos"] for s in ok],
        "pixels": torch.stack([s["pixels"] for s in ok]) if ok else None,
        "hash": [s["hash"] for s in ok],
        "width": [s["width"] for s in ok],
        "height": [s["height"] for s in ok],
        "errors": [(s["pos"], s["error"]) for s in samples if s["error"] is not None],
        "decode_seconds": sum(s["seconds"] for s in samples),
        "count": len(samples),
        "jpegs": _pack_jpegs(jpegs),
    }


def _pack_jpegs(samples: list[dict]) -> dict | None:
    """The JPEG samples of a batch as one uint8 tensor of their bytes (one shared-memory block to pass back from a
    worker, not one per file) and their lists."""
    if not samples:
        return None
    return {"pos": [s["pos"] for s in samples], "hash": [s["hash"] for s in samples],
            "width": [s["width"] for s in samples], "height": [s["height"] for s in samples],
            "orientation": [s["orientation"] for s in samples], "sizes": [len(s["jpeg"]) for s in samples],
            "data": torch.frombuffer(bytearray(b"".join(s["jpeg"] for s in samples)), dtype=torch.uint8)}


def _merge_jpegs(parts: list[dict | None]) -> dict | None:
    """The ``jpegs`` of several batches as one (in their order)."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    out = {k: [v for p in parts for v in p[k]] for k in ("pos", "hash", "width", "height", "orientation", "sizes")}
    out["data"] = torch.cat([p["data"] for p in parts])
    return out


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
                  draft_size: int | None, follow_links: bool = True, device_jpeg: bool = False) -> dict:
    ds = DecodeItems(items, transform, max_pixels=max_pixels, draft_size=draft_size, follow_links=follow_links,
                     device_jpeg=device_jpeg)
    batch = collate([ds[i] for i in range(len(items))])
    batch["pos"] = [start + p for p in batch["pos"]]
    batch["errors"] = [(start + p, r) for p, r in batch["errors"]]
    if batch["jpegs"] is not None:
        batch["jpegs"]["pos"] = [start + p for p in batch["jpegs"]["pos"]]
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
                follow_links: bool = True, device_jpeg: bool = False):
        """Yield collated batches of ``items`` in order (decoded in this process when there are no workers);
        ``follow_links=False`` refuses files that are symbolic links when opened; ``device_jpeg`` leaves the JPEGs
        the device decoder takes undecoded (see :func:`collate`)."""
        items = list(items)
        starts = range(0, len(items), batch_size)
        if self.pool is None:
            for a in starts:
                yield _decode_chunk(items[a:a + batch_size], a, transform, max_pixels, draft_size, follow_links,
                                    device_jpeg)
            return
        args = lambda a, n=batch_size: (items[a:a + n], a, transform, max_pixels, draft_size, follow_links,  # noqa: E731
                                        device_jpeg)
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
                              "decode_seconds": self.timeout, "jpegs": None})
                self.close()
                self.pool = self._start()
        ok = [p for p in parts if p["pixels"] is not None]
        return {"pos": [i for p in ok for i in p["pos"]],
                "pixels": torch.cat([p["pixels"] for p in ok]) if ok else None,
                "hash": [h for p in ok for h in p["hash"]], "width": [w for p in ok for w in p["width"]],
                "height": [h for p in ok for h in p["height"]], "errors": [e for p in parts for e in p["errors"]],
                "decode_seconds": sum(p["decode_seconds"] for p in parts), "count": len(chunk),
                "jpegs": _merge_jpegs([p["jpegs"] for p in parts])}
