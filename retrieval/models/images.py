"""The one image decoder (indexing, queries, training, evaluation, uploads) and image batches for the encoder.

:func:`decode_image` is the reference: the indexer's formats only (``IMAGE_FORMATS``), a per-call pixel limit
read from the header, the first frame, EXIF orientation, greyscale of more than 8 bits stretched from its own
value range, transparency composited onto mid grey. :func:`open_rgb` is the same for a file path, so a query
image is decoded exactly as the same file was when it was indexed. :func:`sniff_image` tells from a file's first
bytes whether it is an image, for files whose extension does not say so.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps

from clipdex.exceptions import ClipdexError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000  # larger images are refused as decompression bombs (PIL's default is 89M)

# PIL never hands other bytes to other decoders (EPS, for one, would run Ghostscript). The order is the order
# PIL tries them in: AVIF before HEIF (both claim the 'mif1' brand; PIL's AVIF declines HEVC files), TGA last
# (it has no magic number). JPEG covers MPO (multi-picture JPEG: its first picture is the image).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF", "JPEG2000", "ICO", "PPM", "TGA")
FORMATS_TEXT = "JPEG, MPO, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF, AVIF, JPEG 2000, ICO, PBM/PGM/PPM or TGA"
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".heic", ".heif", ".hif", ".avif", ".jp2", ".j2k", ".jpf", ".jpx", ".j2c", ".ico",
    ".pbm", ".pgm", ".ppm", ".pnm", ".tga",
})
SNIFF_BYTES = 64  # what :func:`sniff_image` needs of a file
BACKGROUND = (128, 128, 128)  # transparent pixels are composited onto mid grey, neither black nor white

_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1")
_AVIF_BRANDS = (b"avif", b"avis")
_PNM = re.compile(rb"P[1-6]\s+(?:#[^\n]*\n\s*)*\d+\s+\d+")
_BMP_HEADERS = (12, 40, 52, 56, 64, 108, 124)  # the BITMAPINFOHEADER sizes there are
_MAGIC: tuple[tuple[str, Callable[[bytes], bool]], ...] = (
    ("JPEG", lambda h: h.startswith(b"\xff\xd8\xff")),
    ("PNG", lambda h: h.startswith(b"\x89PNG\r\n\x1a\n")),
    ("GIF", lambda h: h[:6] in (b"GIF87a", b"GIF89a")),
    ("WEBP", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP"),
    ("BMP", lambda h: h[:2] == b"BM" and len(h) >= 18 and int.from_bytes(h[14:18], "little") in _BMP_HEADERS),
    ("TIFF", lambda h: h[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")),
    ("HEIF", lambda h: h[4:8] == b"ftyp" and h[8:12] in _HEIF_BRANDS),
    ("AVIF", lambda h: h[4:8] == b"ftyp" and h[8:12] in _AVIF_BRANDS),
    ("JPEG2000", lambda h: h.startswith((b"\xff\x4f\xff\x51", b"\0\0\0\x0cjP  \r\n\x87\n"))),
    ("ICO", lambda h: h[:4] == b"\0\0\1\0" and len(h) >= 10 and h[4:6] != b"\0\0" and h[9] == 0),
    ("PPM", lambda h: _PNM.match(h) is not None),
)
_heif_registered = False


def sniff_image(head: bytes) -> str | None:
    """The format a file's first bytes (``SNIFF_BYTES`` of them) announce, or None if none of ``IMAGE_FORMATS``.

    Only magic numbers are checked, nothing is decoded. TGA has no magic number, so a TGA file is known only
    by its extension.
    """
    return next((name for name, test in _MAGIC if test(head)), None)


def _register_heif() -> None:
    """Teach PIL to read HEIC/HEIF (pillow-heif), once per process, at the first decode (workers included)."""
    global _heif_registered
    if _heif_registered:
        return
    _heif_registered = True
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        logger.warning("pillow-heif is not installed, so HEIC/HEIF images cannot be read: pip install pillow-heif")
        return
    register_heif_opener()


QUARTER_TURNS = (5, 6, 7, 8)  # the EXIF orientations that turn the image a quarter (width and height swap)


def open_header(data: bytes, *, max_pixels: int) -> Image.Image:
    """Bytes -> a PIL image opened lazily (its header read, no pixel decoded), of one of ``IMAGE_FORMATS``.

    Raises ``Image.DecompressionBombError`` when the header claims more than ``max_pixels`` pixels,
    ``Image.UnidentifiedImageError`` when the bytes are none of the formats: what :func:`decode_image` raises,
    because it starts here (the device decoder checks a JPEG's header here too before any pixel is decoded).
    """
    _register_heif()
    Image.MAX_IMAGE_PIXELS = None  # idempotent: the limit below is per call
    im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    if im.width * im.height > max_pixels:
        raise Image.DecompressionBombError(f"{im.width}x{im.height} = {im.width * im.height:,} pixels, over the "
                                           f"limit of {max_pixels:,}")
    return im


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag of an opened image, 1 (as stored) to 8; 1 when it has none or an invalid one (which
    ``ImageOps.exif_transpose`` leaves as stored too)."""
    value = im.getexif().get(0x0112, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def decode_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> tuple[Image.Image, int, int]:
    """Bytes -> RGB PIL image with EXIF orientation applied, plus its (width, height) before any reduction.

    Only the formats in ``IMAGE_FORMATS`` are opened, whatever the file is called. An image of more than
    ``max_pixels`` pixels is refused as a decompression bomb from its header, before any pixel is decoded (PIL's
    own process-wide limit is switched off so that callers with different limits, e.g. threads of the app, never
    race on it). Greyscale of more than 8 bits is stretched by :func:`_to_8bit`; transparency is composited onto
    ``BACKGROUND`` by :func:`_to_rgb`.
    """
    im = open_header(data, max_pixels=max_pixels)
    im.seek(0)  # GIF, TIFF, MPO, HEIF: the first frame
    w, h = im.size
    if draft_size and im.format in ("JPEG", "MPO"):
        im.draft("RGB", (draft_size, draft_size))  # decode a reduced JPEG when it is far bigger than needed
    if exif_orientation(im) in QUARTER_TURNS:
        w, h = h, w
    im.load()
    im = ImageOps.exif_transpose(im)
    return _to_rgb(_to_8bit(im)), w, h


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) greyscale -> 8-bit ``L``, the image's own
    minimum..maximum stretched to 0..255 (PIL's convert would clip them: a 16-bit scan of values 291-694 would
    come out near black). A constant image (nothing to stretch) becomes mid grey, 128; NaN counts as the
    minimum, +/-infinity as the maximum/minimum of the finite values."""
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    import numpy as np

    a = np.asarray(im, dtype=np.float32)
    finite = np.isfinite(a)
    lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
    if hi <= lo:
        return Image.new("L", im.size, 128)
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    return Image.fromarray(np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode -> RGB; an alpha channel or a transparent palette entry/colour is composited onto ``BACKGROUND``
    (a plain convert would make transparent pixels black, or whatever colour they hide)."""
    if not im.has_transparency_data:
        return im.convert("RGB")
    background = Image.new("RGBA", im.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB")


def open_rgb(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB exactly as indexing decodes it (:func:`decode_image`); errors name the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return decode_image(data, max_pixels=max_pixels)[0]
    except Image.DecompressionBombError as e:
        raise ClipdexError(f"{path}: refused as a decompression bomb ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise ClipdexError(f"{path}: not a {FORMATS_TEXT} image") from e
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
