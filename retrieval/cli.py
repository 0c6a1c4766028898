"""CLI subcommands owned by ``retrieval``: models, train, eval (retrieval, oracle), demo."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from clipdex.retrieval.registry import DEFAULT_MODEL

SPEC_HELP = ("model spec: a built-in name (clipdex-world), ARCH:TAG (ViT-B-32:laion2b_s34b_b79k), ARCH:random, "
             "ARCH:/path/weights.pt, hf-hub:ORG/REPO, or a checkpoint path")


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``clipdex`` parser."""
    from clipdex.retrieval import answer_cli

    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("models", help="list built-in models, architectures and spec forms",
                       description="List the built-in trained models, the architectures open_clip can build "
                       "(clipdex's own included) and the forms a model spec may take.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_models)

    p = sub.add_parser("train", help="contrastive training (from scratch or fine-tuning)", formatter_class=fmt,
                       description="Train a dual encoder with the CLIP objective on a manifest of image-caption "
                       "pairs; foils in the manifest become hard negatives. Writes model.safetensors, "
                       "model-compact.safetensors, metrics.jsonl and train.json to --out; re-running the same "
                       "command resumes an interrupted run.",
                       epilog="examples:\n  clipdex train --manifest worlds/w/manifest.parquet --out runs/w\n"
                       "  clipdex train --manifest my_pairs.csv --train-split '' --eval-split '' "
                       "--model ViT-B-32:laion2b_s34b_b79k --lr 1e-5 --epochs 2 --out runs/ft")
    p.add_argument("--manifest", required=True, help="Parquet/CSV/JSONL with path and caption(s) columns")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics)")
    p.add_argument("--model", default="clipdex-s:random", help="start point; " + SPEC_HELP)
    p.add_argument("--train-split", default="train", help="rows used for training ('' for all rows)")
    p.add_argument("--eval-split", default="test", help="held-out rows evaluated after each epoch ('' for none)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--no-hard-negatives", action="store_true", help="do not use foils as extra negatives")
    p.add_argument("--foil-weight", type=float, default=1.0,
                   help="weight of the focused caption-vs-foil term (0: foils only as extra negatives)")
    p.add_argument("--layout-weight", type=float, default=0.0,
                   help="weight of layout supervision (world manifests only): a head shared by both towers must "
                   "read where each shape and colour is, from the image and from the caption's cells and "
                   "relations (0: off)")
    p.add_argument("--eval-gallery", type=int, default=1000, help="held-out gallery size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default: cores - 1)")
    p.add_argument("--save-every", type=int, default=500, help="steps between resumable checkpoints")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="fit the run into this much training time (steps set from the measured rate)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--json", action="store_true", help="print the final record as JSON")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate retrieval (model or oracle)",
                       description="Measure recall@1/5/10 both ways (and foil accuracy) on a manifest split.")
    esub = p.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    r = esub.add_parser("retrieval", help="a model's held-out recall and foil accuracy", formatter_class=fmt,
                        description="Embed the first --gallery images of --split and all their captions; report "
                        "recall@1/5/10 text->image and image->text (ties count against the model) and foil "
                        "accuracy. JSON keys: model, gallery, t2i, i2t, foil.",
                        epilog="example:\n  clipdex eval retrieval --model clipdex-world --manifest "
                        "worlds/demo/manifest.parquet --split test --gallery 1000 --json")
    r.add_argument("--model", default=None, help=SPEC_HELP + f" (default: {DEFAULT_MODEL}, or the collection's)")
    r.add_argument("--db", default=None, help="evaluate an indexed collection instead (its stored vectors)")
    r.add_argument("--collection", default="default", help="with --db: the collection")
    _eval_args(r)
    r.add_argument("--device", default="auto")
    r.add_argument("--workers", type=int, default=None)
    r.set_defaults(func=_eval_retrieval)
    o = esub.add_parser("oracle", help="the attribute oracle's recall (the ceiling the world allows)",
                        formatter_class=fmt,
                        description="Rank by the generator's own attributes: each caption's claims are checked "
                        "against each scene. Same gallery, same pessimistic ties and same JSON as eval retrieval.")
    _eval_args(o)
    o.set_defaults(func=_eval_oracle)
    answer_cli.register_eval(esub)

    from clipdex.retrieval.store import DEFAULT_COLLECTION, DEFAULT_DB

    p = sub.add_parser(
        "search", help="search a collection: text->image, image->image, image->text",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search an indexed collection. A text query finds images; --image FILE finds similar "
        "images; --image FILE --captions finds the captions that describe it. Scores are cosine similarities.",
        epilog="examples:\n"
        "  clipdex search \"a red circle left of a star\"\n"
        "  clipdex search --image query.jpg -k 5\n"
        "  clipdex search --image query.jpg --captions\n"
        "  clipdex search \"two blue squares\" --path 'album-3/*' --where 'width >= 64' --json\n"
        "JSON: {\"query\": ..., \"results\": [{\"rank\", \"id\", \"path\", \"caption\", \"score\"}, ...]}")
    p.add_argument("text", nargs="?", help="text query (omit with --image)")
    p.add_argument("--image", help="image file to query with")
    p.add_argument("--captions", action="store_true", help="with --image: return captions, not images")
    p.add_argument("--db", default=DEFAULT_DB, help=f"database folder (default: {DEFAULT_DB})")
    p.add_argument("--collection", default=DEFAULT_COLLECTION, help="collection (default: %(default)s)")
    p.add_argument("-k", "--top-k", type=int, default=10, help="results (default: %(default)s)")
    p.add_argument("--min-score", type=float, default=None, help="drop results below this cosine score")
    p.add_argument("--path", default=None, metavar="GLOB",
                   help="only images whose path matches (a relative glob matches at any depth: 'album-3/*', '*.png')")
    p.add_argument("--where", default=None, metavar="SQL",
                   help="LanceDB filter over columns id, path, source, size, mtime, width, height")
    p.add_argument("--model", default=None, help="encoder (default: the one the collection was indexed with)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_search)

    p = sub.add_parser("collections", help="list the collections of a database",
                       description="List the collections of a database folder with their sizes and encoders.")
    p.add_argument("--db", default=DEFAULT_DB, help=f"database folder (default: {DEFAULT_DB})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_collections)

    p = sub.add_parser("demo", help="the main job on the embedded default, end to end", formatter_class=fmt,
                       description="Generate a small built-in world if needed, index its corpus with the "
                       "embedded default model (LanceDB + FAISS), show example searches in each direction with "
                       "their scores, ask grounded questions about a photo of a landmark (answer and evidence), and measure "
                       "the collection's recall.")
    p.add_argument("--dir", default="clipdex-data/demo-world", help="where the demo world lives")
    p.add_argument("--db", default=None, help="database folder for the demo collection (default: DIR/db)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=SPEC_HELP)
    p.add_argument("--gallery", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_demo)
    answer_cli.register(sub)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--gallery", type=int, default=1000, help="number of images in the gallery")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _models(args) -> int:
    from clipdex.retrieval.registry import BUILTIN_MODELS, CONFIG_DIR, list_models
    from clipdex.retrieval.spec import FORMS_HELP

    own = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    data = {"builtin": {k: v.description for k, v in BUILTIN_MODELS.items()}, "clipdex_architectures": own,
            "open_clip_architectures": [m for m in list_models() if m not in own], "spec_forms": FORMS_HELP}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print("built-in models:")
    for k, v in data["builtin"].items():
        print(f"  {k:<16} {v}")
    print("clipdex architectures (train with ARCH:random): " + ", ".join(own))
    print(f"open_clip architectures: {len(data['open_clip_architectures'])} (clipdex models --json lists them)")
    print("spec forms: " + FORMS_HELP)
    return 0


def _train(args) -> int:
    from clipdex.retrieval.train import TrainConfig, train

    cfg = TrainConfig(
        manifest=args.manifest, out_dir=args.out, model=args.model, train_split=args.train_split or None,
        eval_split=args.eval_split or None, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, hard_negatives=not args.no_hard_negatives, foil_weight=args.foil_weight,
        layout_weight=args.layout_weight,
        eval_gallery=args.eval_gallery, seed=args.seed, device=args.device, precision=args.precision,
        workers=args.workers, save_every=args.save_every, max_steps=args.max_steps, time_budget_s=args.time_budget,
        command="clipdex " + shlex.join(sys.argv[1:]) if sys.argv and "clipdex" in sys.argv[0] else "",
    )
    record = train(cfg, resume=not args.no_resume, progress=not args.json)
    if args.json:
        print(json.dumps(record))
    else:
        print(f"trained {record['steps']} steps in {record['seconds']:.0f} s on {record['device']}; "
              f"checkpoint: {args.out}/model.safetensors")
        if record["final"]:
            from clipdex.retrieval.evaluate import format_table

            print(format_table(record["final"]))
    return 0


def _eval_retrieval(args) -> int:
    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.retrieval.encoder import load_encoder
    from clipdex.retrieval.evaluate import evaluate_retrieval, format_table
    from clipdex.retrieval.spec import parse_model_spec

    if args.model:
        parse_model_spec(args.model)  # a mistyped spec fails first, before any file is read
    pairs = load_pairs(args.manifest, split=args.split or None)
    if args.db:
        from clipdex.retrieval.collection_eval import evaluate_collection
        from clipdex.retrieval.store import Database

        result = evaluate_collection(Database(args.db).open(args.collection), pairs, gallery=args.gallery,
                                     model=args.model, device=args.device)
    else:
        enc = load_encoder(args.model or DEFAULT_MODEL, device=args.device)
        result = evaluate_retrieval(enc, pairs, gallery=args.gallery, workers=args.workers)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _search(args) -> int:
    from clipdex.retrieval.exceptions import ClipdexError
    from clipdex.retrieval.search import open_collection

    if bool(args.text) == bool(args.image):
        raise ClipdexError("give a text query or --image FILE (one of them)")
    if args.captions and not args.image:
        raise ClipdexError("--captions needs --image FILE (image->text search)")
    col = open_collection(args.db, collection=args.collection, model=args.model, device=args.device)
    opts = {"k": args.top_k, "min_score": args.min_score, "where": args.where, "path_glob": args.path}
    if args.image:
        hits = col.search_captions(args.image, **opts) if args.captions else col.search_image(args.image, **opts)
    else:
        hits = col.search_text(args.text, **opts)
    query = args.text if args.text else args.image
    if args.json:
        print(json.dumps({"query": query, "kind": "image->text" if args.captions else
                          ("image->image" if args.image else "text->image"),
                          "collection": args.collection, "results": [h.as_dict() for h in hits]}))
        return 0
    print(f"{'rank':>4}  {'score':>6}  {'caption' if args.captions else 'path'}")
    for h in hits:
        print(f"{h.rank:>4}  {h.score:>6.3f}  {h.caption if args.captions else h.path}")
    if not hits:
        print("(no results)")
    return 0


def _collections(args) -> int:
    from clipdex.retrieval.store import Database

    db = Database(args.db)
    rows = []
    for name in db.collections():
        col = db.open(name)
        info = col.encoder_info()
        rows.append({"collection": name, "images": col.count(), "captions": col.captions.count_rows(),
                     "model": info.spec, "embed_dim": info.embed_dim})
    if args.json:
        print(json.dumps({"db": str(db.path), "collections": rows}))
        return 0
    print(f"{'collection':<24}{'images':>10}{'captions':>10}  model")
    for r in rows:
        print(f"{r['collection']:<24}{r['images']:>10}{r['captions']:>10}  {r['model']} ({r['embed_dim']}-d)")
    return 0


def _eval_oracle(args) -> int:
    from clipdex.data_manifests.pairs import read_table
    from clipdex.data_manifests.world.oracle import oracle_recall
    from clipdex.retrieval.evaluate import format_table

    result = oracle_recall(read_table(args.manifest), split=args.split, gallery=args.gallery)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _demo(args) -> int:
    from clipdex.retrieval.demo import run_demo

    return run_demo(world_dir=args.dir, db=args.db, model=args.model, gallery=args.gallery, as_json=args.json)
