"""Decode stage: file bytes -> content hash, size and a preprocessed tensor, in DataLoader worker processes.

A file that cannot be decoded (corrupt, truncated, not an image, a decompression bomb) comes back as an
error with its reason instead of a tensor; the batch goes on without it.
"""

from __future__ import annotations

import hashlib
import io
import time
import warnings
from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageOps

from clipdex.indexer.reader import SourceItem

DEFAULT_MAX_PIXELS = 100_000_000  # larger images are refused as decompression bombs (PIL's default is 89M)


def content_hash(data: bytes) -> str:
    """blake2b-128 of a file's bytes, as hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_file(path: str) -> str:
    """The content hash of the file at ``path``."""
    with open(path, "rb") as f:
        return content_hash(f.read())


def decode_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> tuple[Image.Image, int, int]:
    """Bytes -> RGB PIL image with EXIF orientation applied, plus its (width, height) before any reduction."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        if im.width * im.height > max_pixels:
            raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels is over the {max_pixels} limit")
        im.seek(0)  # GIF, TIFF: the first frame
        w, h = im.size
        if draft_size and im.format == "JPEG":
            im.draft("RGB", (draft_size, draft_size))  # decode a reduced JPEG when it is far bigger than needed
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that turn the image a quarter
            w, h = h, w
        im.load()
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB"), w, h


class DecodeItems(torch.utils.data.Dataset):
    """Items -> dict(pos, pixels or None, hash, width, height, error, seconds)."""

    def __init__(self, items: Sequence[SourceItem], transform: Callable, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: int | None = None):
        self.items = list(items)
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
            with open(item.path, "rb") as f:
                data = f.read()
            out["hash"] = content_hash(data)
            im, out["width"], out["height"] = decode_image(data, max_pixels=self.max_pixels,
                                                           draft_size=self.draft_size)
            out["pixels"] = self.transform(im)
        except Image.DecompressionBombError as e:
            out["error"] = f"decompression bomb: {e}"
        except FileNotFoundError:
            out["error"] = "file not found (deleted while indexing?)"
        except Image.UnidentifiedImageError:
            out["error"] = "not an image (unidentified format)"
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning) as e:
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


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers should not fight the encoder for cores


def decoded_batches(items: Sequence[SourceItem], transform: Callable, *, batch_size: int, workers: int,
                    max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None):
    """Yield collated batches of ``items`` in order, decoded by ``workers`` processes (0: in this process)."""
    loader = torch.utils.data.DataLoader(
        DecodeItems(items, transform, max_pixels=max_pixels, draft_size=draft_size), batch_size=batch_size,
        num_workers=workers, shuffle=False, collate_fn=collate, worker_init_fn=_worker_init if workers else None,
        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None,
        persistent_workers=False,
        # not fork: LanceDB's runtime threads do not survive fork() safely
        multiprocessing_context="forkserver" if workers else None)
    yield from loader
