"""Integrity: checksums of a collection's LanceDB files, and the full check behind ``clipdex check``.

LanceDB never rewrites a data file: a commit adds files (data, deletions, a new manifest) and compaction
writes new ones before old versions are deleted. So the blake2b of every file, recorded by the writer at
the end of each run (``DB/_checksums/<collection>.json``, incrementally: a file with the size and mtime it
had is not hashed again), tells later which file changed under it. LanceDB reports a damaged file with
an error that names none; :func:`check_collection` does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from clipdex.exceptions import StoreError
from clipdex.files import atomic_write, hash_file
from clipdex.retrieval.store.record import Collection
from clipdex.retrieval.store.schema import TABLES

logger = logging.getLogger(__name__)

CHECKSUMS_DIR = "_checksums"
NORM_TOLERANCE = 1e-3  # a stored vector's L2 norm must be 1 within this (they are normalised when embedded)


def checksums_path(collection: Collection) -> Path:
    """Where the checksums of ``collection``'s files are kept."""
    return collection.database.path / CHECKSUMS_DIR / f"{collection.name}.json"


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def record_checksums(collection: Collection) -> dict:
    """Hash the collection's files (those new since the last record) and save the record; returns it.
    Call it as the writer, at the end of a run."""
    path = checksums_path(collection)
    old = _load(path).get("files", {})
    root = collection.database.path
    files = {}
    for table_files in collection.files().values():
        for f in table_files:
            rel = str(f.relative_to(root))
            st = f.stat()
            prev = old.get(rel)
            if prev and prev["size"] == st.st_size and prev["mtime_ns"] == st.st_mtime_ns:
                files[rel] = prev
            else:
                files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "blake2b": hash_file(f)}
    record = {"collection": collection.name, "versions": collection.versions(), "files": files}
    try:
        atomic_write(path, lambda p: p.write_text(json.dumps(record, indent=0)))
    except OSError as e:
        logger.warning("could not record the checksums of %s in %s: %s", collection.name, path, e)
    return record


@dataclass
class CheckReport:
    """What :func:`check_collection` found: ``problems`` (each a sentence naming the file or row) and counts."""

    collection: str
    rows: dict[str, int] = field(default_factory=dict)
    files_verified: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing is wrong."""
        return not self.problems

    def as_dict(self) -> dict:
        """The JSON shape."""
        return asdict(self) | {"ok": self.ok}


def _check_files(collection: Collection, report: CheckReport) -> None:
    record = _load(checksums_path(collection))
    if not record:
        report.notes.append(f"no checksums recorded for {collection.name} (indexed by an older clipdex): files "
                            "not verified; the next index run records them")
        return
    root = collection.database.path
    same_version = record.get("versions") == collection.versions()
    if not same_version:
        report.notes.append(f"checksums cover versions {record.get('versions')}, the tables are at "
                            f"{collection.versions()} (a run was stopped before recording): newer files not verified")
    for rel, want in sorted(record["files"].items()):
        f = root / rel
        if not f.exists():
            if same_version:
                report.problems.append(f"{f}: missing (recorded {want['size']} bytes)")
            continue
        if f.stat().st_size != want["size"]:
            report.problems.append(f"{f}: {f.stat().st_size} bytes, recorded {want['size']} (truncated or overwritten)")
        elif hash_file(f) != want["blake2b"]:
            report.problems.append(f"{f}: content differs from its recorded checksum (damaged)")
        report.files_verified += 1


def _check_rows(collection: Collection, table: str, report: CheckReport) -> tuple[set[str], set[str]]:
    """Read every row: readable, vector finite and unit-norm, ids unique. Returns the ids and (captions)
    the image ids they belong to."""
    ids: list[str] = []
    bad: list[str] = []
    key = "image_id" if table == "captions" else None
    owners: set[str] = set()
    dim = collection.encoder_info().embed_dim
    try:
        for batch in collection.scan(table, ["id", "vector", *([key] if key else [])]):
            batch_ids = batch.column("id").to_pylist()
            vec = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            with np.errstate(all="ignore"):  # damaged data may hold NaN, inf or huge values: they are the finding
                norm = np.linalg.norm(vec.astype(np.float64), axis=1)
            wrong = ~np.isfinite(norm) | (np.abs(norm - 1.0) > NORM_TOLERANCE)
            bad += [batch_ids[i] for i in np.flatnonzero(wrong)]
            ids += batch_ids
            if key:
                owners.update(batch.column(key).to_pylist())
    except StoreError as e:
        report.problems.append(f"{table}: {e}")
    report.rows[table] = len(ids)
    if bad:
        report.problems.append(f"{table}: {len(bad)} rows have a vector that is not finite and unit-norm "
                               f"(damaged data), e.g. {bad[0]!r}")
    dup = len(ids) - len(set(ids))
    if dup:
        report.problems.append(f"{table}: {dup} rows repeat an id (clipdex index repairs this)")
    return set(ids), owners


def check_collection(collection: Collection, *, faiss: bool = True) -> CheckReport:
    """Verify a collection: its files against their checksums, every row (readable, vector finite and
    unit-norm, ids unique, captions owned by an image) and, with ``faiss``, its FAISS index files."""
    from clipdex.retrieval.store.faiss_index import check_index_files

    report = CheckReport(collection.name)
    _check_files(collection, report)
    image_ids, _ = _check_rows(collection, "images", report)
    _, owners = _check_rows(collection, "captions", report)
    orphans = len(owners - image_ids)
    if orphans:
        report.notes.append(f"captions of {orphans} images that are not in the collection (a killed run; the next "
                            "index run drops them)")
    if faiss:
        for table in TABLES:
            problem, note = check_index_files(collection, table)
            if problem:
                report.problems.append(problem)
            if note:
                report.notes.append(note)
    return report
