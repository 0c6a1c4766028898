"""The built-in world's manifest: its pyarrow schema, and reading and writing it safely.

One row per image. ``WORLD_SCHEMA`` columns:

- ``id`` (string): ``"<split>/<index:06d>"``, e.g. ``"test/000123"``; the manifest is sorted by id.
- ``path`` (string): the image file, relative to the manifest's folder
  (``images/<split>/album-<k>/IMG_<index>.jpg`` or ``.png``).
- ``split`` (string): ``train``, ``test``, ``corpus`` or ``query``.
- ``width``, ``height`` (int32): pixels.
- ``captions`` (list<string>): complete descriptions, differently worded.
- ``caption_claims`` (list<string>): JSON list of claims of each caption (same order as ``captions``);
  see ``clipdex.data_manifests.world.claims`` for the claim types.
- ``foils`` (list<struct<caption_index:int32, kind:string, text:string, claims:string>>): hard negatives,
  each a perturbation (kind ``relation`` or ``attribute``) of caption ``caption_index``, false for the image.
- ``attributes`` (struct<background: struct<kind, colour>, objects: list<struct<shape, colour, size, fill,
  row:int32, col:int32, x, y, radius, rotation: float32>>>): the generator's ground truth; x, y, radius
  as fractions of the image width (y downwards), rotation in degrees.
- ``questions`` (list<struct<question, answer, kind>>): questions with canonical short answers.
- ``landmark`` (nullable struct<landmark_id:int32, name, year:int32, city, builder>): set on landmark
  scenes (corpus) and their query views.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clipdex.exceptions import ManifestError

MANIFEST_NAME = "manifest.parquet"
SCHEMA_VERSION = "1"

OBJECT_TYPE = pa.struct([
    ("shape", pa.string()), ("colour", pa.string()), ("size", pa.string()), ("fill", pa.string()),
    ("row", pa.int32()), ("col", pa.int32()), ("x", pa.float32()), ("y", pa.float32()),
    ("radius", pa.float32()), ("rotation", pa.float32()),
])
ATTRIBUTES_TYPE = pa.struct([
    ("background", pa.struct([("kind", pa.string()), ("colour", pa.string())])),
    ("objects", pa.list_(OBJECT_TYPE)),
])
FOIL_TYPE = pa.struct([
    ("caption_index", pa.int32()), ("kind", pa.string()), ("text", pa.string()), ("claims", pa.string()),
])
QUESTION_TYPE = pa.struct([("question", pa.string()), ("answer", pa.string()), ("kind", pa.string())])
LANDMARK_TYPE = pa.struct([
    ("landmark_id", pa.int32()), ("name", pa.string()), ("year", pa.int32()), ("city", pa.string()),
    ("builder", pa.string()),
])

WORLD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("captions", pa.list_(pa.string())),
        pa.field("caption_claims", pa.list_(pa.string())),
        pa.field("foils", pa.list_(FOIL_TYPE)),
        pa.field("attributes", ATTRIBUTES_TYPE),
        pa.field("questions", pa.list_(QUESTION_TYPE)),
        pa.field("landmark", LANDMARK_TYPE, nullable=True),
        # Rows sharing a group are relation-swapped twins (train split only): the same scene with two objects'
        # cells exchanged. Training keeps a group in one batch, so each twin is the other's hardest negative.
        pa.field("group", pa.string(), nullable=False),
    ],
    metadata={"clipdex.schema": "world", "clipdex.schema_version": SCHEMA_VERSION},
)
REQUIRED_COLUMNS: tuple[str, ...] = tuple(WORLD_SCHEMA.names)


def rows_to_table(rows: list[dict], *, metadata: dict[str, str] | None = None) -> pa.Table:
    """A table in ``WORLD_SCHEMA`` from row dicts (extra schema metadata optional)."""
    schema = WORLD_SCHEMA
    if metadata:
        schema = schema.with_metadata({**(schema.metadata or {}), **{k.encode(): v.encode()
                                                                       for k, v in metadata.items()}})
    return pa.Table.from_pylist(rows, schema=schema)


def write_manifest(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` to ``path`` atomically (a temporary name in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_manifest(path: str | Path) -> pa.Table:
    """Read a world manifest and check it has every column of ``WORLD_SCHEMA``.

    Raises :class:`~clipdex.exceptions.ManifestError` naming the file when it is missing,
    unreadable, or lacks a required column.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path} (make one with `clipdex world generate --out DIR`)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"{path}: could not read the manifest as Parquet ({e})") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(
            f"{path}: manifest lacks required column(s) {', '.join(missing)} "
            f"(has: {', '.join(table.column_names)}); regenerate it with `clipdex world generate`"
        )
    return table
