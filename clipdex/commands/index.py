"""``clipdex index``: embed a folder or a manifest into a collection (LanceDB + FAISS) and print the run summary."""

from __future__ import annotations

import argparse
import json

from clipdex.commands.argtypes import (
    DEVICE_HELP,
    PRECISION_HELP,
    RUNTIME_HELP,
    RUNTIMES,
    SPEC_HELP,
    WORKERS_HELP,
    float_at_least,
    int_at_least,
)
from clipdex.retrieval.models.registry import DEFAULT_MODEL
from clipdex.retrieval.store.record import DEFAULT_COLLECTION, DEFAULT_DB


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``index`` to the ``clipdex`` parser."""
    p = sub.add_parser(
        "index", help="index a folder or a manifest of images (incremental, resumable)",
        description="Embed every image of a folder (walked recursively: JPEG, MPO, PNG, WebP, GIF, BMP, TIFF, "
        "HEIC/HEIF, AVIF, JPEG 2000, ICO, PBM/PGM/PPM, TGA; a file under another or no extension is indexed if its "
        "first bytes are an image's, any other file is counted by extension and listed in the run's report) or of "
        "a manifest (Parquet/CSV/JSONL with a path column and optional caption/captions columns) into a "
        "collection: LanceDB tables of images and captions, plus FAISS indexes beside them.\n\n"
        "Re-running adds only new or changed files and drops deleted ones; a run that was killed picks up "
        "where it stopped. Files that cannot be decoded are skipped and listed at the end.",
        epilog="examples:\n"
        "  clipdex index ~/Pictures                                   # default db and collection\n"
        "  clipdex index ~/Pictures --db ~/clipdex-db --collection photos\n"
        "  clipdex index worlds/demo/manifest.parquet --split corpus --collection world\n"
        "  clipdex index ~/Pictures --model ViT-B-32:laion2b_s34b_b79k --collection photos-b32 --json\n"
        "  clipdex index /mnt/archive --db /mnt/shared/db --engine ray --address auto --num-gpus-per-worker 0.5")
    p.add_argument("source", help="a folder of images, or a manifest file")
    p.add_argument("--db", default=DEFAULT_DB, metavar="DIR", help="database folder (created if missing)")
    p.add_argument("--collection", default=DEFAULT_COLLECTION, metavar="NAME", help="collection name")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="encoder, a " + SPEC_HELP + "; a collection keeps the encoder it was made with")
    p.add_argument("--split", default=None,
                   help="manifests only: index just the rows of this split (default: every row)")
    g = p.add_argument_group("performance")
    g.add_argument("--batch-size", type=int_at_least(1), default=256, metavar="N", help="images per encoder batch")
    g.add_argument("--workers", type=int_at_least(0), default=None, metavar="N", help=WORKERS_HELP)
    g.add_argument("--decode", default="cpu", choices=["auto", "cpu", "device"],
                   help="where JPEGs are decoded: cpu (the decoding workers; the default), device (in batches on the "
                   "model's device: nvJPEG on a GPU, resized and normalised there; other formats stay on the CPU) or "
                   "auto (device when the model runs on CUDA, else cpu). The device path is tested on the CPU but not "
                   "yet measured on a GPU, hence not the default")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"], help=PRECISION_HELP)
    g.add_argument("--runtime", default="auto", choices=RUNTIMES, help=RUNTIME_HELP)
    g.add_argument("--flush-rows", type=int_at_least(1), default=4096, metavar="N",
                   help="images written to LanceDB per append (larger: fewer table fragments)")
    g.add_argument("--exact-threshold", type=int_at_least(0), default=50_000, metavar="N",
                   help="exact FAISS search up to this many vectors, an IVF index above (IVF-SQ8 past 2M vectors)")
    g.add_argument("--no-faiss", action="store_true", help="skip building FAISS indexes (search builds them)")
    r = p.add_argument_group("ray engine (pip install \"clipdex[ray]\")")
    r.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this machine. ray: decode, embed and write on a Ray cluster with Ray "
                   "Data (the same plan, rows, failures and FAISS indexes; the database folder must be reachable "
                   "at the same path from every node)")
    r.add_argument("--address", default=None, metavar="ADDR",
                   help="the Ray cluster: auto (the one `ray start --head` made here), HOST:6379, or "
                   "ray://HOST:10001 (default: start a local cluster of this machine's cores for the run)")
    r.add_argument("--num-gpus-per-worker", type=float_at_least(0), default=0.0, metavar="N",
                   help="GPUs each embed actor takes: 1, or 0.25 for four actors on one GPU; 0: CPU actors")
    r.add_argument("--embed-actors", type=int_at_least(1), default=None, metavar="N",
                   help="embed actors, each with its own copy of the model (default: one per GPU share, else 1)")
    p.add_argument("--wait", type=float_at_least(0), default=0.0, metavar="SECONDS",
                   help="if another run is writing this collection, wait up to this long for it (default: refuse "
                   "at once, naming it)")
    p.add_argument("--rehash", action="store_true", help="hash every file, not only those whose size/mtime changed")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON (no progress bar)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_index)


def _index(args) -> int:
    from clipdex.indexer.ray_engine import RayConfig
    from clipdex.indexer.runner import IndexSettings, run_index
    from clipdex.retrieval.store.faiss_index import IndexConfig

    settings = IndexSettings(source=args.source, db=args.db, collection=args.collection, model=args.model,
                             split=args.split, batch_size=args.batch_size, workers=args.workers, decode=args.decode,
                             device=args.device,
                             precision=args.precision, runtime=args.runtime, rehash=args.rehash,
                             flush_rows=args.flush_rows, build_index=not args.no_faiss,
                             lock_wait=args.wait, index=IndexConfig(exact_threshold=args.exact_threshold),
                             engine=args.engine,
                             ray=RayConfig(address=args.address, num_gpus_per_worker=args.num_gpus_per_worker,
                                           embed_actors=args.embed_actors))
    summary = run_index(settings, progress=not (args.json or args.no_progress))
    if args.json:
        print(json.dumps(summary))
        return 0
    c, s = summary["counts"], summary["seconds"]
    print(f"{summary['collection']}: {c['images_in_collection']} images, {c['captions_in_collection']} captions "
          f"in {summary['db']} (model {summary['model']}, {summary['device']})")
    by_ext = ", ".join(f"{ext}: {n}" for ext, n in c["ignored_by_extension"].items())
    print(f"this run: {c['indexed']} indexed ({c['new']} new, {c['changed']} changed), {c['unchanged']} unchanged, "
          f"{c['removed']} removed, {c['failed']} failed, {c['ignored_non_images']} non-image files ignored"
          + (f" ({by_ext})" if by_ext else ""))
    engine = summary["engine"]
    if summary["images_per_s"] and engine["name"] == "ray":
        w = engine["worker_seconds"]
        print(f"speed: {summary['images_per_s']:.0f} images/s on Ray ({engine['embed_actors']} embed actors, "
              f"{engine['nodes']} nodes); worker seconds, summed: decode {w['decode']:.1f}, embed {w['embed']:.1f}, "
              f"write {w['write']:.1f}; driver commits {s['write']:.1f} s in {engine['commits']}, faiss "
              f"{s['faiss']:.1f}; total {s['total']:.1f}")
    elif summary["images_per_s"]:
        print(f"speed: {summary['images_per_s']:.0f} images/s; stage seconds: decode wait {s['decode_wait']:.1f}, "
              + (f"device decode {s['device_decode']:.1f}, " if "device_decode" in s else "")
              + f"embed {s['embed']:.1f}, write {s['write']:.1f}, faiss {s['faiss']:.1f}; total {s['total']:.1f}")
    for name, sc in summary["faiss"].items():
        print(f"faiss {name}: {sc['factory']} over {sc['rows']} vectors, recall@10 vs exact "
              f"{sc['recall_at_10_vs_exact']:.3f}")
    if summary["failures"]:
        print(f"\nskipped {len(summary['failures'])} files:")
        for f in summary["failures"]:
            print(f"  {f['path']}: {f['reason']}")
    return 0
