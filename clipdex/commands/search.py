"""``clipdex search`` (text->image, image->image, image->text over a collection, printed as a ranked table
or JSON) and ``clipdex collections`` (a database's collections with their sizes and encoders)."""

from __future__ import annotations

import argparse
import json
import sys

from clipdex.commands.argtypes import DEVICE_HELP, RUNTIME_HELP, RUNTIMES
from clipdex.retrieval.store.record import DEFAULT_COLLECTION, DEFAULT_DB
from clipdex.retrieval.store.rerank import DEFAULT_RERANK
from clipdex.retrieval.store.schema import FILTER_COLUMNS


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``search`` and ``collections`` to the ``clipdex`` parser."""
    _add_search(sub)
    _add_collections(sub)


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search", help="search a collection: text->image, image->image, image->text",
        description="Search an indexed collection. A text query finds images; --image FILE finds similar "
        "images; --image FILE --captions finds the captions that describe it. Scores are cosine similarities. "
        f"A text query's top {DEFAULT_RERANK} images are re-ranked by the model's matcher when it can be (see "
        "--rerank); the match column is then its probability that the text describes the image.",
        epilog="examples:\n"
        "  clipdex search \"a red circle left of a star\"\n"
        "  clipdex search \"a red circle left of a star\" --rerank 0   # the dual encoder's order only\n"
        "  clipdex search --image query.jpg -k 5\n"
        "  clipdex search --image query.jpg --captions\n"
        "  clipdex search \"two blue squares\" --path 'album-3/*' --where 'width >= 64' --json\n"
        "JSON: {\"query\": ..., \"results\": [{\"rank\", \"id\", \"path\", \"caption\", \"score\", \"match\"}, ...], "
        "\"rerank\": {\"k\", \"used\", \"reason\"}}")
    p.add_argument("text", nargs="?", help="text query (omit with --image)")
    p.add_argument("--image", metavar="FILE", help="image file to query with, instead of a text query")
    p.add_argument("--captions", action="store_true", help="with --image: return captions, not images")
    p.add_argument("--db", default=DEFAULT_DB, metavar="DIR", help="database folder")
    p.add_argument("--collection", default=DEFAULT_COLLECTION, metavar="NAME", help="collection to search")
    p.add_argument("-k", "--top-k", type=int, default=10, metavar="K", help="results to return, best first")
    p.add_argument("--min-score", type=float, default=None, metavar="SCORE",
                   help="drop results below this cosine similarity, -1 to 1 (default: keep all)")
    p.add_argument("--path", default=None, metavar="GLOB",
                   help="only images whose path matches (a relative glob matches at any depth: 'album-3/*', '*.png')")
    p.add_argument("--where", default=None, metavar="SQL",
                   help=f"LanceDB filter over columns {', '.join(FILTER_COLUMNS)}")
    p.add_argument("--rerank", type=_depth, default=None, metavar="K",
                   help="text queries: re-order the dual encoder's top K images (at least -k of them) with the model's "
                   "cross-attention matcher, which reads each image's stored patch-token grid and can tell where "
                   f"things are (default {DEFAULT_RERANK}; 0: off). Needs a collection indexed with grids (what clipdex "
                   "index stores for a new collection) and a model with a matcher (MODEL.matcher.safetensors beside "
                   "its weights); without either the dual encoder's order is kept and --json says why. --min-score, "
                   "--path and --where apply to the cosine, before re-ranking")
    p.add_argument("--model", default=None,
                   help="encoder for the query (default: the one the collection was indexed with)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--runtime", default="auto", choices=RUNTIMES, help=RUNTIME_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_search)


def _depth(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = -1
    if k < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of hits to re-rank, 0 to turn re-ranking off")
    return k


def _add_collections(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collections", help="list the collections of a database",
                       description="List the collections of a database folder with their sizes (rows, and bytes on disk "
                       "with the LanceDB versions kept) and encoders.")
    p.add_argument("--db", default=DEFAULT_DB, metavar="DIR", help="database folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_collections)


def _search(args) -> int:
    from clipdex.exceptions import ClipdexError
    from clipdex.retrieval.store.rerank import RerankInfo
    from clipdex.retrieval.store.search import open_collection

    if bool(args.text) == bool(args.image):
        raise ClipdexError("give a text query or --image FILE (one of them)")
    if args.captions and not args.image:
        raise ClipdexError("--captions needs --image FILE (image->text search)")
    col = open_collection(args.db, collection=args.collection, model=args.model, device=args.device,
                          runtime=args.runtime)
    opts = {"k": args.top_k, "min_score": args.min_score, "where": args.where, "path_glob": args.path}
    depth = DEFAULT_RERANK if args.rerank is None else args.rerank
    if args.image:
        hits = col.search_captions(args.image, **opts) if args.captions else col.search_image(args.image, **opts)
        rerank = RerankInfo(depth, False, "re-ranking applies to text queries only")
    else:
        hits = col.search_text(args.text, **opts, rerank=depth)
        rerank = col.rerank_info(depth)
    query = args.text if args.text else args.image
    if args.json:
        print(json.dumps({"query": query, "kind": "image->text" if args.captions else
                          ("image->image" if args.image else "text->image"),
                          "collection": args.collection, "results": [h.as_dict() for h in hits],
                          "rerank": rerank.as_dict()}))
        return 0
    if args.rerank and not rerank.used:  # asked for by name: say why it did not happen
        print(f"note: not re-ranked: {rerank.reason}", file=sys.stderr)
    shown = "caption" if args.captions else "path"
    if rerank.used:
        print(f"{'rank':>4}  {'match':>6}  {'score':>6}  {shown}")
        for h in hits:
            print(f"{h.rank:>4}  {h.match:>6.3f}  {h.score:>6.3f}  {h.path}")
    else:
        print(f"{'rank':>4}  {'score':>6}  {shown}")
        for h in hits:
            print(f"{h.rank:>4}  {h.score:>6.3f}  {h.caption if args.captions else h.path}")
    if not hits:
        print("(no results)")
    return 0


def _collections(args) -> int:
    from clipdex.retrieval.store.record import Database

    db = Database(args.db)
    rows = []
    for name in db.collections():
        col = db.open(name)
        info = col.encoder_info()
        disk = col.disk_usage()
        rows.append({"collection": name, "images": col.count(), "captions": col.caption_count(),
                     "model": info.spec, "embed_dim": info.embed_dim, "disk_bytes": disk["bytes"],
                     "versions": {t: disk[t]["versions"] for t in ("images", "captions")}})
    if args.json:
        print(json.dumps({"db": str(db.path), "collections": rows}))
        return 0
    print(f"{'collection':<24}{'images':>10}{'captions':>10}{'on disk':>11}  model")
    for r in rows:
        print(f"{r['collection']:<24}{r['images']:>10}{r['captions']:>10}{_megabytes(r['disk_bytes']):>11}  "
              f"{r['model']} ({r['embed_dim']}-d)")
    return 0


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
