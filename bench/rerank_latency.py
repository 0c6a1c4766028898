"""What re-ranking adds to a text query (``clipdex search --rerank K``), on this machine's CPU.

A world folder of --images generated images is indexed with --model (clipdex-world: a ViT, so the collection
stores each image's patch-token grid) into WORK/rerank-db-*, or reused. Then, over --queries world-style
captions after --warmup more:
  (a) the matcher's forward alone (``match_scores``) for each K of --ks, on the query's token states and
      the grids of its top-K hits, both already in memory;
  (b) reading those K grids from LanceDB (``Collection.grids``);
  (c) the caption's token states (``DualEncoder.text_states``);
  (d) end to end: a warm ``SearchCollection.search_text`` with rerank=K against rerank=0, alternated.
Each as p50/p90/p99 ms. Target: rerank=50 adds <= 15 ms p50. Also the grids' storage per million images.

No matcher is shipped yet: without --matcher a randomly initialised one of the shipped shape is written to WORK,
with the encoder's fingerprint (the compute is the same as a trained one's; the order it gives is meaningless).

    .venv/bin/python bench/rerank_latency.py                          # 2000 images, 200 queries
    .venv/bin/python bench/rerank_latency.py --images 500 --queries 50 --threads 1   # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from common import captions, ensure_world, machine, pct, set_threads, write_report

QS = (50, 90, 99)
TARGET_K, TARGET_MS = 50, 15.0


def ensure_collection(*, folder: Path, db: Path, model: str, images: int, fresh: bool):
    """The collection ``bench`` of ``db``: ``folder`` indexed with ``model``, grids stored (or reused)."""
    from clipdex.indexer.runner import IndexSettings, run_index
    from clipdex.retrieval.store.record import Database

    if fresh:
        shutil.rmtree(db, ignore_errors=True)
    if db.is_dir() and "bench" in Database(db).collections():
        col = Database(db).open("bench")
        if col.count() == images and col.grid_layout() is not None:
            print(f"reused {db} ({images} images with grids)", flush=True)
            return col
        shutil.rmtree(db)
    t0 = time.perf_counter()
    summary = run_index(IndexSettings(source=str(folder), db=str(db), collection="bench", model=model), progress=False)
    print(f"indexed {summary['counts']['indexed']} images into {db} ({time.perf_counter() - t0:.1f} s)", flush=True)
    col = Database(db).open("bench")
    if col.grid_layout() is None:
        raise SystemExit(f"{model} gives no patch-token grids (not a ViT?): nothing to re-rank with")
    return col


def ensure_matcher(given: str | None, *, encoder, layout: dict, work: Path, seed: int) -> tuple[Path, str]:
    """(the matcher file, 'given' or 'random'): --matcher, or a random one of the shipped shape (the grid's cells
    and width, the width of the encoder's caption token features) written afresh to ``work`` with the encoder's
    fingerprint (so ``load_matcher_for`` accepts it)."""
    if given:
        return Path(given), "given"
    import torch

    from clipdex.retrieval.models.matcher import Matcher, MatcherConfig, save_matcher

    states, _ = encoder.text_states(["a"])
    cfg = MatcherConfig(image_dim=layout["width"], text_dim=int(states.shape[-1]), cells=layout["cells"])
    tag = "".join(c for c in encoder.info.weights if c.isalnum())[:16] or "noweights"
    path = work / f"random-{tag}-s{seed}.matcher.safetensors"
    torch.manual_seed(seed)  # written every run: a file from an older matcher architecture would not load
    save_matcher(Matcher(cfg), path, encoder_weights=encoder.info.weights,
                 record={"random_init": True, "seed": seed, "note": "bench/rerank_latency.py: compute only"})
    return path, "random"


def _orders(ks: list[int], i: int) -> list[int]:
    return ks if i % 2 == 0 else ks[::-1]  # alternate, so drift in machine load hits every K alike


def time_components(*, sc, model, texts: list[str], ks: list[int], warmup: int) -> dict:
    """Seconds per call of (c) ``text_states``, and per K of (b) ``Collection.grids`` and (a) ``match_scores``
    with the matcher ``model``, on each query's own top-K hits (their grids and dual-encoder cosines)."""
    import torch

    from clipdex.retrieval.models.matcher import match_scores

    enc, col = sc.encoder, sc.collection
    states_s, grids_s, forward_s = [], {k: [] for k in ks}, {k: [] for k in ks}
    for i, text in enumerate(texts):
        hits = sc.search_text(text, k=max(ks), rerank=0)  # not timed
        ids, cos = [h.id for h in hits], torch.tensor([h.score for h in hits], dtype=torch.float32)
        t0 = time.perf_counter()
        states, mask = enc.text_states([text])
        dt = time.perf_counter() - t0
        if i >= warmup:
            states_s.append(dt)
        for k in _orders(ks, i):
            t0 = time.perf_counter()
            grids = col.grids(ids[:k])
            t1 = time.perf_counter()
            match_scores(model, states, mask, torch.from_numpy(grids), cos[:k])
            t2 = time.perf_counter()
            if i >= warmup:
                grids_s[k].append(t1 - t0)
                forward_s[k].append(t2 - t1)
    return {"text_states": states_s, "grids": grids_s, "forward": forward_s}


def time_end_to_end(*, sc, texts: list[str], ks: list[int], k: int, warmup: int) -> dict[int, list[float]]:
    """Seconds per ``search_text(text, k=k, rerank=R)`` for R in 0 and ``ks``, alternated query by query."""
    modes = [0, *ks]
    out = {m: [] for m in modes}
    for i, text in enumerate(texts):
        for m in _orders(modes, i):
            t0 = time.perf_counter()
            hits = sc.search_text(text, k=k, rerank=m)
            dt = time.perf_counter() - t0
            if m and hits and hits[0].match is None:
                raise SystemExit(f"rerank={m} did not re-rank: {sc.rerank_info(m).reason}")
            if i >= warmup:
                out[m].append(dt)
    return out


def storage(*, col, layout: dict) -> dict:
    """The grids' bytes per image and per million images (cells x width x 2), against the vector's, and what the
    images table takes on disk per image now."""
    from clipdex.retrieval.store.schema import grid_bytes

    per_image, vec = grid_bytes(layout), 4 * col.encoder_info().embed_dim
    disk = col.disk_usage()["images"]["bytes"]
    return {"layout": layout, "grid_bytes_per_image": per_image, "grid_gib_per_million": per_image * 1e6 / 2**30,
            "grid_gb_per_million": per_image * 1e6 / 1e9, "vector_bytes_per_image": vec,
            "vector_gib_per_million": vec * 1e6 / 2**30,
            "images_table_disk_bytes_per_image": disk / max(1, col.count())}


def summarise(comp: dict, e2e: dict, ks: list[int]) -> dict:
    """Percentiles of every measurement, and what rerank=K adds over rerank=0 (difference of the percentiles,
    and percentiles of the per-query paired difference)."""
    base = np.asarray(e2e[0])
    added = {}
    for k in ks:
        run = np.asarray(e2e[k])
        added[k] = {"p50_minus_p50_ms": (np.percentile(run, 50) - np.percentile(base, 50)) * 1e3,
                    **{f"paired_{n}": v for n, v in pct(list(run - base), QS).items()},
                    "sum_of_component_p50_ms": sum(pct(x, (50,))["p50_ms"] for x in
                                                   (comp["text_states"], comp["grids"][k], comp["forward"][k]))}
    return {"matcher_forward": {k: pct(comp["forward"][k], QS) for k in ks},
            "grids_read": {k: pct(comp["grids"][k], QS) for k in ks},
            "text_states": pct(comp["text_states"], QS),
            "search_text": {k: pct(v, QS) for k, v in e2e.items()}, "added_by_rerank": added}


def print_table(res: dict, ks: list[int]) -> None:
    """The results table, to stdout."""
    head = f"{'what':<44} {'K':>4} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"
    print(head + "\n" + "-" * len(head))
    row = lambda name, k, d, pre="": print(  # noqa: E731
        f"{name:<44} {k:>4} {d[pre + 'p50_ms']:>8.2f} {d[pre + 'p90_ms']:>8.2f} {d[pre + 'p99_ms']:>8.2f}")
    for k in ks:
        row("(a) matcher forward (match_scores)", k, res["matcher_forward"][k])
    for k in ks:
        row("(b) grids read (Collection.grids)", k, res["grids_read"][k])
    row("(c) caption token states (text_states)", "-", res["text_states"])
    row("(d) search_text rerank=0", 0, res["search_text"][0])
    for k in ks:
        row(f"(d) search_text rerank={k}", k, res["search_text"][k])
    for k in ks:
        row("    added: paired (rerank=K - rerank=0)", k, res["added_by_rerank"][k], "paired_")
    print()
    for k in ks:
        a = res["added_by_rerank"][k]
        print(f"K={k:<4} added p50: {a['p50_minus_p50_ms']:.2f} ms (p50 rerank={k} - p50 rerank=0); paired "
              f"{a['paired_p50_ms']:.2f} ms; (a)+(b)+(c) p50s {a['sum_of_component_p50_ms']:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and writes the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = ap.add_argument
    arg("--model", default="clipdex-world", help="encoder of the collection and the queries (default %(default)s)")
    arg("--images", type=int, default=2000, help="images in the indexed world (default %(default)s)")
    arg("--size", type=int, default=128, help="world image side in pixels (default %(default)s)")
    arg("--queries", type=int, default=200, help="timed queries (default %(default)s)")
    arg("--warmup", type=int, default=10, help="untimed queries first (default %(default)s)")
    arg("--ks", default="10,50,100", help="re-ranking depths K (default %(default)s)")
    arg("--k", type=int, default=10, help="results per search_text (default %(default)s)")
    arg("--matcher", default=None, metavar="FILE", help="matcher file (default: a random one written to WORK)")
    arg("--seed", type=int, default=0, help="world, caption and random-matcher seed (default 0)")
    arg("--threads", type=int, default=None, help="torch and FAISS threads (default: theirs, all cores)")
    arg("--work", default="/tmp/clipdex-bench", help="worlds, the database and the random matcher go here")
    arg("--fresh", action="store_true", help="re-index the collection")
    arg("--out", default=str(Path(__file__).parent / "results" / "rerank_latency.json"),
        help="JSON report (default bench/results/rerank_latency.json)")
    args = ap.parse_args(argv)

    from clipdex.retrieval.models.encoder import load_encoder
    from clipdex.retrieval.store.rerank import load_matcher_for
    from clipdex.retrieval.store.search import SearchCollection

    set_threads(args.threads)
    ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    work, load_start = Path(args.work), os.getloadavg()
    work.mkdir(parents=True, exist_ok=True)
    folder = ensure_world(work=work, images=args.images, seed=args.seed, size=args.size)
    slug = "".join(c if c.isalnum() else "_" for c in args.model)
    col = ensure_collection(folder=folder, db=work / f"rerank-db-{slug}-n{args.images}-s{args.seed}-px{args.size}",
                            model=args.model, images=args.images, fresh=args.fresh)
    encoder, layout = load_encoder(col.encoder_info().spec), col.grid_layout()
    matcher, kind = ensure_matcher(args.matcher, encoder=encoder, layout=layout, work=work, seed=args.seed)
    sc = SearchCollection(col, encoder=encoder, matcher=matcher)  # the matcher is checked as search loads it
    model = load_matcher_for(encoder, matcher, grid=layout).model
    texts = captions(n=args.warmup + args.queries, seed=args.seed)
    mcfg = model.config
    print(f"{args.model}, {col.count()} images, grids {layout['cells']} cells x {layout['width']} fp16; matcher "
          f"{matcher} ({kind}{': random weights, the same compute as a trained one' if kind == 'random' else ''}; "
          f"image_dim {mcfg.image_dim}, text_dim {mcfg.text_dim}, width {mcfg.width}, {mcfg.layers} layers); "
          f"{args.queries} queries after {args.warmup} warm-up, e.g. {texts[0]!r}", flush=True)
    comp = time_components(sc=sc, model=model, texts=texts, ks=ks, warmup=args.warmup)
    e2e = time_end_to_end(sc=sc, texts=texts, ks=ks, k=args.k, warmup=args.warmup)
    res, store = summarise(comp, e2e, ks), storage(col=col, layout=layout)
    mach, load_end = machine(), os.getloadavg()
    print()
    print_table(res, ks)
    added = res["added_by_rerank"].get(TARGET_K, {}).get("p50_minus_p50_ms")
    verdict = None if added is None else bool(added <= TARGET_MS)
    print(f"\ntarget: rerank={TARGET_K} adds <= {TARGET_MS:g} ms p50: "
          f"{'not measured' if verdict is None else ('met' if verdict else 'NOT met')}"
          f"{'' if added is None else f' ({added:.2f} ms)'}")
    print(f"grid storage: {layout['cells']} cells x {layout['width']} x 2 bytes = {store['grid_bytes_per_image']} B an "
          f"image, {store['grid_gib_per_million']:.2f} GiB ({store['grid_gb_per_million']:.2f} GB) per million images "
          f"(the {4 * col.encoder_info().embed_dim} B vector: {store['vector_gib_per_million']:.2f} GiB); the images "
          f"table takes {store['images_table_disk_bytes_per_image']:.0f} B an image on disk now")
    print(f"torch threads {mach['torch_threads']}, FAISS threads {mach['faiss_threads']}, cores {mach['cores']}; "
          f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end (other processes on the "
          "cores inflate every figure)")
    report = {"benchmark": "rerank_latency", "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:],
              "machine": mach, "load_average": {"start": load_start, "end": load_end},
              "config": {"model": args.model, "images": col.count(), "queries": args.queries, "warmup": args.warmup,
                         "ks": ks, "k": args.k, "matcher": str(matcher), "matcher_kind": kind,
                         "matcher_config": dataclasses.asdict(model.config),
                         "example_captions": texts[:5]},
              "storage": store, "results": res,
              "target": {"k": TARGET_K, "added_p50_ms_at_most": TARGET_MS, "added_p50_ms": added, "met": verdict}}
    write_report(report, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
