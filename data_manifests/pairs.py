"""Image–caption pairs from any manifest: the built-in world's Parquet, or a user's Parquet, CSV or JSONL.

A manifest needs a ``path`` column (relative paths are resolved against the manifest's folder) and
captions in either a ``captions`` list column or a ``caption`` string column. Optional: ``id``, ``split``,
``foils`` (list of {caption_index, kind, text}: hard-negative captions, as the world writes them) and
``group`` (rows sharing a group, such as the world's relation-swapped twins, are put in one batch), and the
world's ``attributes`` and ``caption_claims`` (layout supervision, :mod:`clipdex.retrieval.training.layout`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from clipdex.exceptions import ManifestError


@dataclass
class Pairs:
    """Images with their captions (and optional foils), in manifest order."""

    manifest: Path
    ids: list[str]
    paths: list[Path]
    captions: list[list[str]]
    foils: list[list[dict]] = field(default_factory=list)  # per image: [{"caption_index", "kind", "text"}]
    groups: list[str] = field(default_factory=list)  # rows sharing a group are batched together in training
    objects: list[list[dict]] = field(default_factory=list)  # per image: the world's attributes.objects
    caption_claims: list[list[str]] = field(default_factory=list)  # per image: each caption's claims (JSON)

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, n: int) -> "Pairs":
        """The first ``n`` images (a deterministic gallery)."""
        return Pairs(self.manifest, self.ids[:n], self.paths[:n], self.captions[:n], self.foils[:n],
                     self.groups[:n], self.objects[:n], self.caption_claims[:n])


def read_table(path: str | Path) -> pa.Table:
    """Read a Parquet, CSV or JSONL manifest into a pyarrow Table; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path)
        if suffix in (".jsonl", ".json", ".ndjson"):
            import pyarrow.json as pjson

            return pjson.read_json(path)
    except pa.ArrowException as e:
        raise ManifestError(f"{path}: could not read the manifest ({e})") from e
    raise ManifestError(f"{path}: unknown manifest type {suffix!r}; use .parquet, .csv or .jsonl")


def load_pairs(manifest: str | Path, *, split: str | None = None) -> Pairs:
    """Load the image–caption pairs of ``manifest`` (only rows of ``split`` when given)."""
    manifest = Path(manifest)
    table = read_table(manifest)
    cols = set(table.column_names)
    if "path" not in cols:
        raise ManifestError(f"{manifest}: no 'path' column (columns: {sorted(cols)})")
    if "captions" not in cols and "caption" not in cols:
        raise ManifestError(f"{manifest}: needs a 'captions' (list) or 'caption' (string) column")
    if split is not None:
        if "split" not in cols:
            raise ManifestError(f"{manifest}: --split {split!r} given but the manifest has no 'split' column")
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table["split"], split))
        if table.num_rows == 0:
            raise ManifestError(f"{manifest}: no rows with split == {split!r}")
    rows = table.to_pylist()
    root = manifest.parent
    captions = []
    for r in rows:
        caps = r.get("captions")
        if caps is None:
            caps = [r["caption"]] if r.get("caption") else []
        elif isinstance(caps, str):  # CSV/JSON may hold a JSON-encoded list or one caption
            caps = json.loads(caps) if caps.startswith("[") else [caps]
        captions.append([c for c in caps if c])
    ids = [str(r["id"]) if r.get("id") is not None else str(r["path"]) for r in rows]  # path when no id column
    foils = [list(r.get("foils") or []) for r in rows] if "foils" in cols else []
    groups = [str(r["group"]) for r in rows] if "group" in cols else []
    world = "attributes" in cols and "caption_claims" in cols
    objects = [list((r["attributes"] or {}).get("objects") or []) for r in rows] if world else []
    claims = [list(r["caption_claims"] or []) for r in rows] if world else []
    paths = [Path(r["path"]) if Path(r["path"]).is_absolute() else root / r["path"] for r in rows]
    return Pairs(manifest=manifest, ids=ids, paths=paths, captions=captions, foils=foils, groups=groups,
                 objects=objects, caption_claims=claims)
