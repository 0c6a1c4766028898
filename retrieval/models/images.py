"""The one image decoder (indexing, queries, training, evaluation, uploads) and image batches for the encoder.

:func:`decode_image` is the reference: the indexer's formats only, a per-call pixel limit read from the header,
the first frame, EXIF orientation, 16-bit and float greyscale scaled into 8 bits. :func:`open_rgb` is the same
for a file path, so a query image is decoded exactly as the same file was when it was indexed.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps

from clipdex.exceptions import ClipdexError

DEFAULT_MAX_PIXELS = 100_000_000  # larger images are refused as decompression bombs (PIL's default is 89M)


IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # PIL never hands other bytes to other
# decoders (EPS, for one, would run Ghostscript)


def decode_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> tuple[Image.Image, int, int]:
    """Bytes -> RGB PIL image with EXIF orientation applied, plus its (width, height) before any reduction.

    Only the formats in ``IMAGE_FORMATS`` are opened. An image of more than ``max_pixels`` pixels is refused
    as a decompression bomb from its header, before any pixel is decoded (PIL's own process-wide limit is
    switched off so that callers with different limits, e.g. threads of the app, never race on it).
    """
    Image.MAX_IMAGE_PIXELS = None  # idempotent: the limit below is per call
    im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
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
    return _to_8bit(im).convert("RGB"), w, h


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale images scaled into 0-255 (PIL's convert would clip them)."""
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    import numpy as np

    a = np.asarray(im, dtype=np.float32)
    if im.mode.startswith("I;16"):
        a = a / 257.0
    elif im.mode == "F" and a.size and float(a.max()) <= 1.0:
        a = a * 255.0
    elif a.size and float(a.max()) > 255.0:
        a = a * (255.0 / float(a.max()))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")


def open_rgb(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB exactly as indexing decodes it (:func:`decode_image`); errors name the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return decode_image(data, max_pixels=max_pixels)[0]
    except Image.DecompressionBombError as e:
        raise ClipdexError(f"{path}: refused as a decompression bomb ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise ClipdexError(f"{path}: not a JPEG, PNG, WebP, GIF, BMP or TIFF image") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ClipdexError(f"{path}: cannot read image ({e})") from e


class ImageFiles(torch.utils.data.Dataset):
    """Paths -> transformed tensors (``transform`` is open_clip's preprocess)."""

    def __init__(self, paths: Sequence[Path], transform: Callable):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(open_rgb(self.paths[i]))


def default_workers() -> int:
    """Worker processes for decoding: all cores but one, at least 1 (0 would decode in the main process)."""
    import os

    return max(1, min(8, (os.cpu_count() or 2) - 1))


def iter_image_batches(paths: Sequence[Path], transform: Callable, *, batch_size: int = 256,
                       workers: int | None = None):
    """Yield preprocessed (B, 3, H, W) batches of ``paths`` in order, decoded in worker processes."""
    workers = default_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(ImageFiles(paths, transform), batch_size=batch_size,
                                         num_workers=workers, shuffle=False,
                                         persistent_workers=False, pin_memory=torch.cuda.is_available())
    yield from loader
