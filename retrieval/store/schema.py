"""What a collection's two LanceDB tables look like: their schemas, the metadata recorded in them, the layout
of the patch-token grids, and the names a collection may have. Plain pyarrow: nothing here calls LanceDB
(:mod:`clipdex.retrieval.store.record` does).

Each collection is two tables, ``<name>__images`` and ``<name>__captions``. The encoder that filled them
(spec, architecture, embedding size, preprocessing, weights fingerprint) is recorded in each table's schema
metadata under ``clipdex.encoder``, with ``clipdex.store_version``.

Patch-token grids: a collection created with an encoder that gives them (``DualEncoder.has_grid``) has one
more images column, ``grid``: each image's ``side`` x ``side`` grid of the image tower's final patch tokens
as the raw bytes of a (cells, width) float16 array, row-major from the top left; the layout is recorded in
the images table's schema metadata under ``clipdex.grid`` (JSON: side, cells, width, dtype). A cross-
attention matcher reads them to re-rank a text query's hits (:mod:`clipdex.retrieval.store.rerank`).
Storage: cells * width * 2 bytes per image (:func:`grid_bytes`); the 4 x 4 fp16 grid of width 256
(clipdex-world) is 8 KiB per image, about 7.6 GiB per million images (the 256-d float32 vector is 1 KiB).
Collections made before grids (no column, no metadata) keep working everywhere; they are searched without
re-ranking.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from clipdex.exceptions import StoreError

if TYPE_CHECKING:  # the encoder module imports torch; the store does not need it to open a database
    from clipdex.retrieval.models.info import EncoderInfo

ENCODER_KEY = b"clipdex.encoder"
STORE_VERSION_KEY = b"clipdex.store_version"
GRID_KEY = b"clipdex.grid"  # images-table metadata: the layout of the ``grid`` column (absent: no grids)
# images-table metadata: the precision of the image tower that embedded the images, fp32 (PyTorch or an fp32 ONNX
# export: the same vectors to 1e-4) or int8 (absent: fp32, collections made before int8); an append is held to it
IMAGE_PRECISION_KEY = b"clipdex.image_precision"
IMAGE_PRECISIONS = ("fp32", "int8")
STORE_VERSION = b"1"
GRID_DTYPE = "float16"
TABLES = ("images", "captions")
# the images-table columns a ``where`` filter may use (what ``search --where`` documents and errors list)
FILTER_COLUMNS = ("id", "path", "source", "content_hash", "size", "mtime", "width", "height")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class ExistingRow:
    """What the store knows of an indexed file, to decide whether it changed."""

    id: str
    path: str
    content_hash: str
    size: int
    mtime: float
    captions: tuple[str, ...]


def images_schema(info: "EncoderInfo", *, grid: dict | None = None, image_precision: str = "fp32") -> pa.Schema:
    """The images table: one row per indexed file; with a ``grid`` layout (:func:`check_grid_layout`), a
    ``grid`` column of each image's patch-token grid as raw float16 bytes; ``image_precision`` (one of
    :data:`IMAGE_PRECISIONS`) in the metadata."""
    grid = check_grid_layout(grid) if grid is not None else None
    if image_precision not in IMAGE_PRECISIONS:
        raise StoreError(f"image precision {image_precision!r}: use one of {', '.join(IMAGE_PRECISIONS)}")
    meta = (_metadata(info) | ({GRID_KEY: json.dumps(grid, sort_keys=True).encode()} if grid else {})
            | {IMAGE_PRECISION_KEY: image_precision.encode()})
    grid_field = [pa.field("grid", pa.binary(), nullable=False)] if grid else []  # cells * width * 2 bytes
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),  # absolute path (folders) or the manifest's id
        pa.field("path", pa.string(), nullable=False),  # absolute path of the file
        pa.field("source", pa.string(), nullable=False),  # the folder or manifest it was indexed from
        pa.field("content_hash", pa.string(), nullable=False),  # blake2b-128 of the file's bytes
        pa.field("size", pa.int64(), nullable=False),  # bytes
        pa.field("mtime", pa.float64(), nullable=False),  # seconds since the epoch
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), info.embed_dim), nullable=False),
        *grid_field,
    ], metadata=meta)


def captions_schema(info: "EncoderInfo") -> pa.Schema:
    """The captions table: one row per caption of an indexed image."""
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),  # "<image id>#<k>"
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), info.embed_dim), nullable=False),
    ], metadata=_metadata(info))


def _metadata(info: "EncoderInfo") -> dict[bytes, bytes]:
    return {ENCODER_KEY: json.dumps(info.as_dict(), sort_keys=True).encode(), STORE_VERSION_KEY: STORE_VERSION}


def check_grid_layout(layout: dict) -> dict:
    """A grid layout as the store records it: ``{"side", "cells", "width", "dtype"}`` with cells = side**2
    and dtype float16 (what ``DualEncoder.encode_image_grid_tensors`` gives); anything else is refused."""
    try:
        out = {"side": int(layout["side"]), "cells": int(layout["cells"]), "width": int(layout["width"]),
               "dtype": str(layout.get("dtype", GRID_DTYPE))}
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"bad patch-token grid layout {layout!r}: need side, cells, width and dtype") from e
    if out["side"] < 1 or out["cells"] != out["side"] ** 2 or out["width"] < 1 or out["dtype"] != GRID_DTYPE:
        raise StoreError(f"bad patch-token grid layout {layout!r}: cells must be side**2, width positive and "
                         f"dtype {GRID_DTYPE}")
    return out


def grid_bytes(layout: dict) -> int:
    """Bytes one image's grid takes in the ``grid`` column: cells * width * 2 (float16)."""
    return layout["cells"] * layout["width"] * np.dtype(GRID_DTYPE).itemsize


def check_name(name: str) -> str:
    """A collection name: letters, digits, ``_`` and ``-``, up to 64 characters."""
    if not _NAME.match(name or ""):
        raise StoreError(f"bad collection name {name!r}: use letters, digits, '_' and '-' (up to 64)")
    return name


__all__ = ["ENCODER_KEY", "FILTER_COLUMNS", "GRID_DTYPE", "GRID_KEY", "STORE_VERSION", "STORE_VERSION_KEY", "TABLES",
           "captions_schema", "check_grid_layout", "check_name", "grid_bytes", "images_schema"]
