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


SPATIAL_COLLECTION = "demo-spatial"
SPATIAL_PAIRS = 40  # two-object scenes, each beside its twin with the two objects' cells swapped


def spatial_world(world_dir: Path, *, pairs: int = SPATIAL_PAIRS) -> Path:
    """A small collection that only position can search: ``pairs`` two-object scenes, each beside its twin
    with the objects' cells swapped, each with the caption that states its relation, false of the twin (the
    spatial probe's ``swap`` groups, :mod:`clipdex.retrieval.evaluation.spatial_probe`). Written once;
    returns its manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipdex.data_manifests.world.claims import satisfies
    from clipdex.retrieval.evaluation.spatial_probe import SpatialProbeConfig, build_group

    folder = world_dir / "spatial"
    manifest = folder / "manifest.parquet"
    if manifest.exists():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    rows, g = [], 0
    while len(rows) < 2 * pairs:
        group = build_group("swap", g, config=SpatialProbeConfig(seed=DEMO_SEED))
        g += 1
        if satisfies(group.claims[0], group.scenes[1]) or satisfies(group.claims[1], group.scenes[0]):
            continue  # a size relation ("larger than") holds for both twins: position cannot decide it
        p = len(rows) // 2
        for v, (image, text) in enumerate(zip(group.images, group.texts)):
            name = f"pair{p:02d}-{'ab'[v]}.png"
            image.save(folder / name)
            rows.append({"id": name, "path": name, "captions": [text], "pair": p})
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def spatial_examples(search, *, manifest: Path) -> dict:
    """Each twin's caption queries the spatial collection, the dual encoder's order against the re-ranked
    one: how often the right twin comes first each way, and the first query the re-ranker gets right where
    the dual encoder does not (the two images differ only in where the objects are)."""
    from clipdex.data_manifests.pairs import load_pairs

    pairs = load_pairs(manifest)
    info = search.rerank_info()
    out = {"queries": len(pairs.ids), "dual_top1": 0, "rerank_top1": None, "rerank": info.as_dict(), "example": None}
    if info.used:
        out["rerank_top1"] = 0
    for i, caps in enumerate(pairs.captions):
        twin = pairs.ids[i ^ 1]  # rows come in twin pairs: a, b
        dual = search.search_text(caps[0], k=2, rerank=0)
        dual_ok = dual[0].id == pairs.ids[i]
        out["dual_top1"] += dual_ok
        if not info.used:
            continue
        ranked = search.search_text(caps[0], k=2)
        rerank_ok = ranked[0].id == pairs.ids[i]
        out["rerank_top1"] += rerank_ok
        if rerank_ok and not dual_ok and out["example"] is None:
            cos = {h.id: h.score for h in dual}
            out["example"] = {"query": caps[0], "expected": str(pairs.paths[i]), "twin": str(pairs.paths[i ^ 1]),
                              "twin_caption": pairs.captions[i ^ 1][0],
                              "dual": [{"path": h.path, "score": h.score, "hit": h.id == pairs.ids[i]} for h in dual],
                              "reranked": [{"path": h.path, "score": cos.get(h.id, h.score), "match": h.match,
                                            "hit": h.id == pairs.ids[i]} for h in ranked],
                              "twin_id": twin}
    return out


def _print_spatial(sp: dict) -> None:
    n = sp["queries"]
    print(f"[where things are] {n // 2} two-object scenes, each beside its twin with the objects swapped "
          f"(collection {SPATIAL_COLLECTION!r}); each caption queries all {n} images:")
    print(f"   the dual encoder alone puts the right twin first for {sp['dual_top1']} of {n} (chance: half)")
    if sp["rerank_top1"] is None:
        print(f"   no re-ranking: {sp['rerank']['reason']}")
        print()
        return
    print(f"   re-ranked by the matcher (top {sp['rerank']['k']}): {sp['rerank_top1']} of {n}")
    ex = sp["example"]
    if ex:
        print(f"   e.g. {ex['query']}")
        print(f"        its twin's caption: {ex['twin_caption']}")
        for r in ex["dual"]:
            print(f"      dual encoder  {r['score']:.3f}  {r['path']}{'   <- right' if r['hit'] else ''}")
        for r in ex["reranked"]:
            print(f"      re-ranked     match {r['match']:.3f} (cosine {r['score']:.3f})  {r['path']}"
                  f"{'   <- right' if r['hit'] else ''}")
    print()


def run_demo(*, world_dir: str | Path, db: str | Path | None = None, model: str, gallery: int = 1000,
             as_json: bool = False, k: int = 3) -> int:
    """Run the demo and print what it finds (a report, or JSON with ``as_json``); returns the exit code."""
    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.indexer.runner import IndexSettings, run_index
    from clipdex.retrieval.evaluation.collection import evaluate_collection
    from clipdex.retrieval.models.encoder import load_encoder
    from clipdex.retrieval.store.record import Database
    from clipdex.retrieval.store.search import SearchCollection

    t0 = time.time()
    world_dir = Path(world_dir)
    manifest = ensure_world(world_dir, gallery=gallery)
    db = Path(db) if db else world_dir / "db"
    encoder = load_encoder(model)  # one load for indexing, search, the spatial collection and recall
    summary = run_index(IndexSettings(source=str(manifest), split="corpus", db=str(db), collection=DEMO_COLLECTION,
                                      model=model), progress=not as_json, encoder=encoder)
    collection = Database(db).open(DEMO_COLLECTION)
    search = SearchCollection(collection, encoder=encoder)
    pairs = load_pairs(manifest, split="corpus")
    examples = search_examples(search, pairs=pairs, k=k)
    asked = ask_examples(search, world_dir=world_dir, manifest=manifest)
    spatial_manifest = spatial_world(world_dir)
    run_index(IndexSettings(source=str(spatial_manifest), db=str(db), collection=SPATIAL_COLLECTION, model=model,
                            workers=0), progress=False, encoder=encoder)  # 80 small PNGs: decode in-process
    spatial = spatial_examples(SearchCollection(Database(db).open(SPATIAL_COLLECTION), encoder=encoder),
                               manifest=spatial_manifest)
    recall = evaluate_collection(collection, pairs, gallery=len(pairs), model=model, encoder=encoder)
    out = {"model": model, "world": str(manifest), "db": str(db), "collection": DEMO_COLLECTION,
           "index": {"counts": summary["counts"], "images_per_s": summary["images_per_s"],
                     "seconds": summary["seconds"]},
           "recall": recall, "examples": examples, "spatial": spatial, "ask": asked, "seconds": round(time.time() - t0, 1)}
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
    _print_spatial(out["spatial"])
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
