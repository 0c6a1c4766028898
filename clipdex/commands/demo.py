"""``clipdex demo``: the main job on the embedded default, end to end, in about a minute on 2 cores.

Generates a small built-in world (scenes the model never saw, plus a few landmarks) if it is not there
yet, indexes its corpus into a collection (LanceDB + FAISS, incremental: a second run re-uses it), shows
example searches in each direction with their cosine scores, asks the shipped answering decoder two
grounded questions about a new photo of a landmark (with the evidence), and measures the collection's recall.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from clipdex.commands.argtypes import SPEC_HELP
from clipdex.retrieval.models.registry import DEFAULT_MODEL

DEMO_SEED = 20261124  # not the seed the default was trained on: every demo scene is new to the model
DEMO_COLLECTION = "demo"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``clipdex`` parser."""
    p = sub.add_parser("demo", help="the main job on the embedded default, end to end",
                       description="Generate a small built-in world if needed, index its corpus with the "
                       "embedded default model (LanceDB + FAISS), show example searches in each direction with "
                       "their scores, ask grounded questions about a photo of a landmark (answer and evidence), "
                       "and measure the collection's recall. A second run re-uses the world and the collection.")
    p.add_argument("--dir", default="clipdex-data/demo-world", metavar="DIR",
                   help="where the demo world lives (generated if missing)")
    p.add_argument("--db", default=None, metavar="DB",
                   help="database folder for the demo collection (default: DIR/db)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="encoder, a " + SPEC_HELP)
    p.add_argument("--gallery", type=int, default=1000, metavar="N",
                   help="ordinary corpus scenes of a new demo world (4 landmarks come on top)")
    p.add_argument("--json", action="store_true", help="print everything it found as one JSON object")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    return run_demo(world_dir=args.dir, db=args.db, model=args.model, gallery=args.gallery, as_json=args.json)


def ensure_world(world_dir: Path, *, gallery: int) -> Path:
    """Generate the demo world (a corpus of ``gallery`` scenes and 4 landmarks) unless it exists; returns its manifest."""
    from clipdex.data_manifests.world.generate import WorldConfig, generate_world

    manifest = world_dir / "manifest.parquet"
    if not manifest.exists():
        cfg = WorldConfig(seed=DEMO_SEED, train=0, test=0, corpus=gallery, landmarks=4, views_per_landmark=2)
        generate_world(cfg, out_dir=world_dir, progress=True)
    return manifest


def ask_examples(search, *, world_dir: Path, manifest: Path) -> list[dict]:
    """Grounded questions about a query view of the first landmark, answered by the shipped decoder from the
    collection (its facts are only in the landmark's corpus captions)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from clipdex.retrieval.answer.answerer import Answerer, BuiltinBackend
    from clipdex.retrieval.evaluation.answer_world import FACT_OF_KIND, facts_of

    table = pq.read_table(manifest)
    views = table.filter(pc.equal(table["split"], "query")).to_pylist()
    if not views:
        return []
    view = views[0]
    answerer = Answerer(search, BuiltinBackend())
    out = []
    for kind, question in (("landmark_year", "when was it built?"), ("landmark_builder", "who built it?")):
        r = answerer.ask(image=str(world_dir / view["path"]), question=question)
        out.append(r.as_dict() | {"image": str(world_dir / view["path"]),
                                  "expected": facts_of(view["landmark"])[FACT_OF_KIND[kind]]})
    return out


def search_examples(search, *, pairs, k: int) -> list[dict]:
    """Example searches over the collection: three text->image, one image->image, one image->text."""
    examples = []
    for qi in (0, 1, 2):  # text -> image: one of an image's captions; the right image is the one it describes
        q = pairs.captions[qi][1]
        examples.append({"direction": "text->image", "query": q, "expected": str(pairs.paths[qi]),
                         "results": [{"path": h.path, "score": h.score, "hit": h.id == pairs.ids[qi]}
                                     for h in search.search_text(q, k=k)]})
    qi = 3  # image -> image: the nearest other images
    hits = [h for h in search.search_image(pairs.paths[qi], k=k + 1) if h.id != pairs.ids[qi]][:k]
    caption_of = dict(zip(pairs.ids, pairs.captions))
    examples.append({"direction": "image->image", "query": str(pairs.paths[qi]),
                     "results": [{"path": h.path, "score": h.score, "caption": caption_of[h.id][0]} for h in hits]})
    qi = 4  # image -> text: captions from the whole collection
    examples.append({"direction": "image->text", "query": str(pairs.paths[qi]),
                     "results": [{"caption": h.caption, "score": h.score, "hit": h.image_id == pairs.ids[qi]}
                                 for h in search.search_captions(pairs.paths[qi], k=k)]})
    return examples


def run_demo(*, world_dir: str | Path, db: str | Path | None = None, model: str, gallery: int = 1000,
             as_json: bool = False, k: int = 3) -> int:
    """Run the demo and print what it finds (a report, or JSON with ``as_json``); returns the exit code."""
    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.indexer.runner import IndexSettings, run_index
    from clipdex.retrieval.evaluation.collection import evaluate_collection
    from clipdex.retrieval.store.record import Database
    from clipdex.retrieval.store.search import SearchCollection

    t0 = time.time()
    world_dir = Path(world_dir)
    manifest = ensure_world(world_dir, gallery=gallery)
    db = Path(db) if db else world_dir / "db"
    summary = run_index(IndexSettings(source=str(manifest), split="corpus", db=str(db), collection=DEMO_COLLECTION,
                                      model=model), progress=not as_json)
    collection = Database(db).open(DEMO_COLLECTION)
    search = SearchCollection(collection)
    pairs = load_pairs(manifest, split="corpus")
    examples = search_examples(search, pairs=pairs, k=k)
    asked = ask_examples(search, world_dir=world_dir, manifest=manifest)
    recall = evaluate_collection(collection, pairs, gallery=len(pairs), model=model)
    out = {"model": model, "world": str(manifest), "db": str(db), "collection": DEMO_COLLECTION,
           "index": {"counts": summary["counts"], "images_per_s": summary["images_per_s"],
                     "seconds": summary["seconds"]},
           "recall": recall, "examples": examples, "ask": asked, "seconds": round(time.time() - t0, 1)}
    if as_json:
        print(json.dumps(out))
    else:
        print_report(out)
    return 0


def print_report(out: dict) -> None:
    """The demo's report, from the dict ``run_demo`` prints with ``--json``."""
    db, c = out["db"], out["index"]["counts"]
    print(f"\nclipdex demo: model {out['model']}; collection {DEMO_COLLECTION!r} in {db}: {c['images_in_collection']} "
          f"images, {c['captions_in_collection']} captions of the built-in world (scenes the model never saw)")
    if c["indexed"]:
        print(f"indexed {c['indexed']} images and their {c['captions_in_collection']} captions in "
              f"{out['index']['seconds']['index_loop']:.0f} s ({out['index']['images_per_s']:.0f} images/s with "
              "captions)")
    else:
        print(f"already indexed ({c['unchanged']} unchanged)")
    print()
    _print_examples(out["examples"])
    asked = out["ask"]
    if asked:
        _print_answers(asked)
    print("measured on the whole collection (every caption queries every image, and back):")
    from clipdex.retrieval.evaluation.recall import format_table  # imports torch: not at `clipdex --help`

    print(format_table(out["recall"]))
    print(f"\n({out['seconds']:.0f} s)   next: clipdex search \"a red circle left of a star\" --db {db} "
          f"--collection {DEMO_COLLECTION}")
    if asked:
        print(f"       clipdex ask --image {asked[0]['image']} \"who built it?\" --db {db} --collection {DEMO_COLLECTION}")


def _print_examples(examples: list[dict]) -> None:
    """Each example search with its results' scores; the right result marked."""
    for ex in examples:
        print(f"[{ex['direction']}] {ex['query']}")
        for r in ex["results"]:
            mark = {True: "  <- right", False: ""}.get(r.get("hit"), "")
            print(f"   {r['score']:.3f}  {r.get('path') or r.get('caption')}{mark}")
            if ex["direction"] == "image->image":
                print(f"          {r['caption']}")
        print()


def _print_answers(asked: list[dict]) -> None:
    """The grounded questions, their answers and the expected fact, then the first one's evidence."""
    from clipdex.commands.ask import print_evidence
    from clipdex.retrieval.answer.backend import Evidence

    print(f"[grounded answering] a new photo of a landmark: {asked[0]['image']}")
    for a in asked:
        print(f"Q: {a['question']}\nA: {a['answer']}   (the landmark's caption says: {a['expected']})")
    print_evidence([Evidence(**e) for e in asked[0]["evidence"][:3]])  # ask_examples keeps the JSON shape
    print()
