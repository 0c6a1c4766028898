"""``clipdex check``: verify a database's collections (files against their checksums, every row, FAISS) and
print a report; exit 1 when something is wrong."""

from __future__ import annotations

import argparse
import json

from clipdex.retrieval.store.record import DEFAULT_DB


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``check`` to the ``clipdex`` parser."""
    p = sub.add_parser(
        "check", help="verify a database: checksums, every row, the FAISS indexes",
        description="Verify the collections of a database folder: every LanceDB file against the checksum the "
        "writer recorded (naming the file that changed), every row (readable, vector finite and unit-norm, ids "
        "unique, captions owned by an image) and the saved FAISS indexes (checksums, sizes). Reads only; "
        "exits 0 when all is well, 1 when a problem is found (the report names it).",
        epilog="examples:\n"
        "  clipdex check --db ~/clipdex-db\n"
        "  clipdex check --db ~/clipdex-db --collection photos --json")
    p.add_argument("--db", default=DEFAULT_DB, metavar="DIR", help="database folder")
    p.add_argument("--collection", default=None, metavar="NAME", help="only this collection (default: all)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_check)


def _check(args) -> int:
    from clipdex.retrieval.store.integrity import check_collection
    from clipdex.retrieval.store.record import Database

    db = Database(args.db)
    names = [args.collection] if args.collection else db.collections()
    reports = [check_collection(db.open(name)) for name in names]
    ok = all(r.ok for r in reports)
    if args.json:
        print(json.dumps({"db": str(db.path), "ok": ok, "collections": [r.as_dict() for r in reports]}))
        return 0 if ok else 1
    for r in reports:
        rows = ", ".join(f"{n} {k}" for k, n in r.rows.items())
        print(f"{r.collection}: {'ok' if r.ok else 'PROBLEMS'} ({rows}; {r.files_verified} files verified)")
        for line in r.problems:
            print(f"  problem: {line}")
        for line in r.notes:
            print(f"  note: {line}")
    if not names:
        print(f"no collections in {db.path}")
    return 0 if ok else 1
