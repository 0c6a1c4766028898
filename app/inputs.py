"""Everything a request brings, checked before use: uploaded images, folders to index, collection names,
and every file the app opens.

No Streamlit here, so the checks are tested directly. Uploads are decoded in memory and never written to
disk; an image picked from the collection is named by its id and opened only at the path its row records
(:mod:`clipdex.app.backend`); a folder to index must lie under one of the roots ``clipdex app`` was given.
Links are resolved before any file is opened: a file whose real path leaves the app's folders is neither
indexed nor opened (:func:`confine_listing`, :func:`read_confined`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from clipdex.exceptions import ClipdexError, StoreError
from clipdex.indexer.reader import SourceItem, SourceListing
from clipdex.retrieval.models.images import decode_image
from clipdex.retrieval.store.schema import check_name

OUTSIDE = "a link out of the folders this app may open (not followed)"

UPLOAD_TYPES = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


class InputError(ClipdexError):
    """An upload, a picked image, a folder or a name the app refuses; the message says why and what to do."""


def decode_checked(data: bytes, *, label: str, max_pixels: int) -> Image.Image:
    """Bytes -> RGB image, identified among the indexer's formats and decoded only if at most ``max_pixels``
    (the check reads the header, before any pixel is decoded)."""
    try:
        im, _, _ = decode_image(data, max_pixels=max_pixels)
    except Image.DecompressionBombError as e:
        raise InputError(f"{label} was refused as a decompression bomb: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise InputError(f"{label} is not a JPEG, PNG, WebP, GIF, BMP or TIFF image") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise InputError(f"{label} cannot be decoded ({e})") from e
    return im


def check_upload(name: str, data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """An uploaded file as an RGB image, or :class:`InputError` saying what is wrong with it."""
    suffix = Path(name).suffix.lower().lstrip(".")
    if suffix not in UPLOAD_TYPES:
        raise InputError(f"{name!r}: upload a {', '.join(UPLOAD_TYPES)} image")
    if not data:
        raise InputError(f"{name!r} is empty")
    if len(data) > max_bytes:
        raise InputError(f"{name!r} is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB")
    return decode_checked(data, label=repr(name), max_pixels=max_pixels)


def check_index_folder(text: str, *, roots: tuple[str, ...], db: str) -> Path:
    """A folder typed into the Collection page, resolved, checked to be under one of ``roots`` and outside
    the database folder; :class:`InputError` otherwise."""
    if not roots:
        raise InputError("this app may index no folder: restart it with clipdex app --index-root DIR")
    text = (text or "").strip()
    if not text or "\x00" in text:
        raise InputError("type the absolute path of a folder of images")
    path = Path(text).expanduser()
    if not path.is_absolute():
        raise InputError(f"{text!r} is not an absolute path (start it with / or ~)")
    try:
        path = path.resolve()  # symlinks and '..' resolved before the roots are compared
    except (OSError, RuntimeError) as e:
        raise InputError(f"cannot resolve {text!r}: {e}") from e
    allowed = resolved_roots(roots)
    if not any(path.is_relative_to(r) for r in allowed):  # checked first: says nothing of paths outside
        raise InputError(f"{path} is outside the folders this app may index ({', '.join(map(str, allowed))}); "
                         "restart it with clipdex app --index-root DIR to allow another")
    if path.is_relative_to(Path(db).resolve()):
        raise InputError(f"{path} is inside the database folder; index a folder of your images")
    if not path.is_dir():
        raise InputError(f"no such folder: {path}")
    return path


def check_collection_name(name: str) -> str:
    """A collection name the store accepts (letters, digits, '_' and '-')."""
    try:
        return check_name((name or "").strip())
    except StoreError as e:
        raise InputError(str(e)) from e


def resolved_roots(roots: Iterable[str | Path]) -> tuple[Path, ...]:
    """``roots`` with ``~`` expanded and every link resolved, as the paths checked against them are."""
    return tuple(Path(r).expanduser().resolve() for r in roots)


def inside(path: str | Path, *, roots: tuple[Path, ...]) -> Path | None:
    """The real path of ``path`` (every link resolved) if it exists and lies under one of ``roots`` (already
    resolved, see :func:`resolved_roots`); None otherwise."""
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):  # gone, a broken link, a link loop
        return None
    return real if any(real.is_relative_to(r) for r in roots) else None


def read_confined(path: str, *, roots: tuple[Path, ...]) -> bytes:
    """The bytes of a collection file, read only if its real path lies under ``roots``; the real path is then
    opened without following a link (one swapped in after the check is refused too). :class:`InputError`
    otherwise."""
    real = inside(path, roots=roots)
    if real is None:
        if not os.path.exists(path):
            raise InputError(f"{path} is gone (or a broken link); re-index the collection")
        raise InputError(f"{path} is outside the folders this app may open; restart it with "
                         "clipdex app --index-root DIR to allow its folder")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO never blocks
    try:
        fd = os.open(real, flags)
    except OSError as e:
        raise InputError(f"{path} cannot be read ({e.strerror})") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        return f.read()


def confine_listing(listing: SourceListing, *,
                    roots: tuple[Path, ...]) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """A folder's listing (:func:`clipdex.indexer.reader.read_folder`, which stats files but opens none) split
    into the items to index, each with its real path, and the files refused with the reason: links whose real
    path leaves ``roots`` (already resolved) and what the reader could not list."""
    items, refused = [], list(listing.missing)
    for item in listing.items:
        real = inside(item.path, roots=roots)
        if real is None:
            refused.append((item.path, OUTSIDE))
        else:
            items.append(SourceItem(id=item.id, path=str(real), captions=item.captions, size=item.size,
                                    mtime=item.mtime))
    return items, refused
