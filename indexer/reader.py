"""Read stage: walk a folder or a manifest and list what there is to index (no decoding here).

A folder's file is an image if its extension says so (``IMAGE_SUFFIXES``) or, failing that, if its first
``SNIFF_BYTES`` bytes carry an image format's magic number (a PNG saved as ``.dat``, a JPEG with no extension);
every other file is listed as ignored, with its reason, and counted by extension.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from clipdex.exceptions import ManifestError
from clipdex.retrieval.models.images import IMAGE_SUFFIXES, SNIFF_BYTES, sniff_image

MANIFEST_SUFFIXES = frozenset({".parquet", ".csv", ".jsonl", ".ndjson", ".json"})


@dataclass(frozen=True)
class SourceItem:
    """One file to index: its id in the collection, its absolute path, captions, size and mtime."""

    id: str  # folders: the absolute path; manifests: the id column (else the path as written)
    path: str
    captions: tuple[str, ...] = ()
    size: int = 0
    mtime: float = 0.0


@dataclass
class SourceListing:
    """What the reader found: the items, plus files it skipped (with the reason)."""

    source: str  # recorded with every row: deletions only touch rows of the same source
    items: list[SourceItem]
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): not images, by type
    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): listed but not indexable

    def ignored_by_extension(self) -> dict[str, int]:
        """How many files were ignored per extension (lower case, ``"(none)"`` for names without one)."""
        counts: dict[str, int] = {}
        for path, _ in self.ignored:
            ext = Path(path).suffix.lower() or "(none)"
            counts[ext] = counts.get(ext, 0) + 1
        return dict(sorted(counts.items()))


def _stat(path: str) -> tuple[int, float] | None:
    """(size, mtime) of a regular file; None for anything else (gone, a FIFO, a device)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_size, st.st_mtime


def _printable(path: str) -> str:
    """``path`` as valid UTF-8 (undecodable bytes of a file name replaced), for reports."""
    return path.encode("utf-8", "replace").decode()


def _not_an_image(path: str, st: tuple[int, float] | None) -> str | None:
    """Why a file whose extension is not an image's is not indexed, or None if its first bytes are an image's."""
    if st is None:
        return "not a regular file (or gone)"
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        return f"not an image type, and cannot be read to check its content ({e.strerror or e})"
    if sniff_image(head) is None:
        return "not an image type (by extension, and its first bytes match no image format)"
    return None


def _bad_name(path: str) -> str | None:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (rename the file to index it)"
    return None


def read_folder(root: str | Path) -> SourceListing:
    """Every image file under ``root`` (recursively, sorted), by extension or else by content; a file's id is
    its absolute path, so folders indexed into one collection never clash. Hidden files and folders are
    passed over; other files that are not images are listed in ``ignored`` with the reason."""
    root = Path(root).resolve()
    items, ignored, skipped = [], [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            st = _stat(path)
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                why = _not_an_image(path, st)
                if why:
                    ignored.append((_printable(path), why))
                    continue
            bad = _bad_name(path)
            if bad or st is None:
                skipped.append((_printable(path), bad or "not a regular file (or gone)"))
                continue
            items.append(SourceItem(id=path, path=path, size=st[0], mtime=st[1]))
    return SourceListing(source=str(root), items=items, ignored=ignored, missing=skipped)


def read_manifest(manifest: str | Path, *, split: str | None = None) -> SourceListing:
    """The rows of a Parquet, CSV or JSONL manifest: ``path`` (relative to the manifest), optional ``id``,
    ``captions`` (list) or ``caption`` (string) and ``split``."""
    from clipdex.data_manifests.pairs import load_pairs

    manifest = Path(manifest).resolve()
    try:
        pairs = load_pairs(manifest, split=split)
    except ManifestError as e:
        if "needs a 'captions'" not in str(e):
            raise
        pairs = _paths_only(manifest, split=split)  # captions are optional for indexing
    items, missing = [], []
    seen = set()
    for i, p, caps in zip(pairs.ids, pairs.paths, pairs.captions):
        if i in seen:
            raise ManifestError(f"{manifest}: id {i!r} appears twice")
        seen.add(i)
        st = _stat(str(p))
        if st is None:
            missing.append((str(p), "file not found"))
            continue
        items.append(SourceItem(id=i, path=str(Path(p).resolve()), captions=tuple(caps), size=st[0], mtime=st[1]))
    source = str(manifest) + (f"#split={split}" if split else "")
    return SourceListing(source=source, items=items, missing=missing)


def _paths_only(manifest: Path, *, split: str | None):
    from clipdex.data_manifests.pairs import Pairs, read_table

    t = read_table(manifest)
    if "path" not in t.column_names:
        raise ManifestError(f"{manifest}: no 'path' column (columns: {sorted(t.column_names)})")
    if split is not None and "split" not in t.column_names:
        raise ManifestError(f"{manifest}: --split {split!r} given but the manifest has no 'split' column")
    if split is not None:
        import pyarrow.compute as pc

        t = t.filter(pc.equal(t["split"], split))
    rows = t.to_pylist()
    paths = [Path(r["path"]) if Path(r["path"]).is_absolute() else manifest.parent / r["path"] for r in rows]
    return Pairs(manifest, [str(r["id"]) if r.get("id") is not None else str(r["path"]) for r in rows], paths, [[] for _ in rows])


def read_source(source: str | Path, *, split: str | None = None) -> SourceListing:
    """A folder (walked) or a manifest file (read); errors name the path."""
    source = Path(source)
    if source.is_dir():
        if split:
            raise ManifestError(f"--split applies to manifests; {source} is a folder")
        return read_folder(source)
    if source.is_file():
        if source.suffix.lower() not in MANIFEST_SUFFIXES:
            raise ManifestError(f"{source}: not a folder or a manifest (.parquet, .csv, .jsonl)")
        return read_manifest(source, split=split)
    raise ManifestError(f"source not found: {source}")
