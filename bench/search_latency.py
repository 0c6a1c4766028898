"""Search latency, recall and index memory at 10k / 100k / 1M vectors, exact (Flat) and approximate (IVF), and the
compressed index (IVF-SQ8) the defaults choose above 2M vectors, forced at 1M.

Vectors are synthetic: a seeded mixture of --centres gaussian clusters in the default model's space (256-d),
L2-normalised, written into a real LanceDB collection (ids v{i}, paths /synthetic/{i}.jpg). For each size
and index kind: build seconds (clipdex ``build_for``), RSS growth while loading the index (``load_for``),
text->image latency with the default encoder in-process, raw FAISS ``index.search`` latency on one query
vector, clipdex ``search_vector`` latency on the same vectors (overhead = clipdex / raw, target <= 1.2) and
recall@10 of IVF against exact search. At the sizes in --compressed-sizes (1M) it also measures "compressed":
``IndexConfig.compressed_factory`` (``IVF{nlist},SQ8``; ``IVF{nlist},PQ{m}x8`` with m = 64 at 256-d when
``search_latency-pq.json`` was measured), forced by setting
``compressed_threshold`` to 0: the index the defaults build at 10M and 100M, checked at 1M with the same compression.

    .venv/bin/python bench/search_latency.py                 # 10k, 100k, 1M; PQ at 1M (~9 min on 2 idle cores, estimated)
    .venv/bin/python bench/search_latency.py --sizes 10000   # quick
    .venv/bin/python bench/search_latency.py --sizes 10000 --compressed-sizes 10000 --out /tmp/x.json  # quick PQ
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from common import captions, machine, pct, set_threads, write_report

from clipdex.retrieval.store.faiss_index import IndexConfig as IndexConfigDefaults  # the defaults, for --help


def mixture(*, centres: np.ndarray, count: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` L2-normalised float32 vectors: a random centre plus gaussian noise of norm ~``noise``."""
    d = centres.shape[1]
    x = centres[rng.integers(0, len(centres), count)]
    x += rng.standard_normal((count, d), dtype=np.float32) * np.float32(noise / math.sqrt(d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def ensure_collection(*, db, name: str, info, size: int, centres: np.ndarray, noise: float, seed: int,
                      chunk: int) -> tuple[object, float]:
    """The collection ``name`` holding ``size`` synthetic vectors (written in ``chunk``-row appends, or reused).

    Returns (collection, seconds spent writing; 0 when reused).
    """
    import pyarrow as pa

    from clipdex.retrieval.store.schema import images_schema

    if name in db.collections():
        col = db.open(name)
        if col.count() == size:
            return col, 0.0
        for t in (f"{name}__images", f"{name}__captions"):
            db.db.drop_table(t)
    col = db.open_or_create(name, info=info)
    schema, t0 = images_schema(info), time.perf_counter()
    for k, start in enumerate(range(0, size, chunk)):
        m = min(chunk, size - start)
        vec = mixture(centres=centres, count=m, noise=noise, rng=np.random.default_rng([seed, 1, k]))
        idx = range(start, start + m)
        cols = [pa.array([f"v{i}" for i in idx]), pa.array([f"/synthetic/{i}.jpg" for i in idx]),
                pa.array(["/synthetic"] * m), pa.array(["0" * 32] * m), pa.array(np.zeros(m, np.int64)),
                pa.array(np.zeros(m, np.float64)), pa.array(np.full(m, 64, np.int32)),
                pa.array(np.full(m, 64, np.int32)),
                pa.ListArray.from_arrays(pa.array(np.zeros(m + 1, np.int32)), pa.array([], pa.string())),
                pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), info.embed_dim)]
        col.append(pa.Table.from_arrays(cols, schema=schema), None)
    return col, time.perf_counter() - t0


def memory_mb() -> dict:
    """RSS and peak RSS in MB: /proc/self/status (VmRSS, VmHWM), else psutil (RSS), else getrusage (peak)."""
    try:
        with open("/proc/self/status") as f:
            st = dict(ln.split(":", 1) for ln in f if ":" in ln)
        return {"rss": int(st["VmRSS"].split()[0]) / 1024, "peak": int(st["VmHWM"].split()[0]) / 1024}
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        import psutil

        return {"rss": psutil.Process().memory_info().rss / 2**20, "peak": peak}
    except ImportError:
        return {"rss": None, "peak": peak}


def reset_peak() -> bool:
    """Reset this process's peak-RSS mark (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _load_in_child(db_path: str, name: str, config: dict) -> dict:
    import faiss  # noqa: F401 - imported before measuring: the library's own size is not the index's

    from clipdex.retrieval.store.faiss_index import IndexConfig, load_for
    from clipdex.retrieval.store.record import Database

    col = Database(db_path).open(name)
    col.versions(), col.count("images")  # warm LanceDB (load_for's freshness check) before measuring
    before, peak_ok = memory_mb(), reset_peak()
    t0 = time.perf_counter()
    loaded = load_for(col, "images", config=IndexConfig(**config), rebuild_stale=False)
    seconds, after = time.perf_counter() - t0, memory_mb()  # measured while ``loaded`` is alive
    return {"before": before, "after": after, "peak_ok": peak_ok, "seconds": seconds, "rows": loaded.index.ntotal}


def load_memory(*, col, config) -> dict:
    """RSS before/after and peak while ``load_for`` loads the persisted index, in a fresh (spawned) process:
    memory an earlier index freed in this process would be reused without growing its RSS."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from dataclasses import asdict

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(_load_in_child, str(col.database.path), col.name, asdict(config)).result()


def time_queries(*, sc, loaded, texts: list[str], queries: np.ndarray, k: int):
    """Seconds per text query (``search_text``), per raw FAISS search and per ``search_vector``; raw top-k ids."""
    for t in texts[:3]:
        sc.search_text(t, k=k)  # warm-up
    t2i, raw, ours, ids = [], [], [], []
    for t in texts:
        t0 = time.perf_counter()
        sc.search_text(t, k=k)
        t2i.append(time.perf_counter() - t0)
    for i, q in enumerate(queries):  # alternate which goes first, so drift in machine load hits both
        for which in ((0, 1) if i % 2 else (1, 0)):
            t0 = time.perf_counter()
            if which == 0:
                ids.append(loaded.index.search(q[None], k)[1][0])
                raw.append(time.perf_counter() - t0)
            else:
                sc.search_vector(q, k=k)
                ours.append(time.perf_counter() - t0)
    return t2i, raw, ours, np.stack(ids)


def bench_kind(*, col, kind: str, config, encoder, texts: list[str], queries: np.ndarray, k: int,
               truth: np.ndarray | None) -> dict:
    """Build, load and query one index kind of ``col``; returns its row of the report (with ``ids`` found)."""
    from clipdex.retrieval.store.faiss_index import build_for
    from clipdex.retrieval.store.search import SearchCollection

    t0 = time.perf_counter()
    sidecar = build_for(col, "images", config=config).sidecar  # the built index is dropped: load_for reads it
    build_s = time.perf_counter() - t0
    gc.collect()
    n, per_m = sidecar["rows"], 1e6 / sidecar["rows"]
    child = load_memory(col=col, config=config)
    before, after = child["before"], child["after"]
    mem = {"rss_before_mb": before["rss"], "rss_after_mb": after["rss"], "peak_mb": after["peak"],
           "rss_growth_mb": after["rss"] - before["rss"] if after["rss"] is not None else None,
           "rss_growth_mb_per_m": (after["rss"] - before["rss"]) * per_m if after["rss"] is not None else None,
           "peak_growth_mb_per_m": (after["peak"] - before["rss"]) * per_m if child["peak_ok"] else None,
           "raw_vectors_mb_per_m": 4 * col.encoder_info().embed_dim, "measured_in": "a fresh spawned process"}
    sc = SearchCollection(col, encoder=encoder, index_config=config)
    t0 = time.perf_counter()
    loaded = sc.index("images")  # load_for: reads the persisted index and its rows
    load_s = time.perf_counter() - t0
    t2i, raw, ours, ids = time_queries(sc=sc, loaded=loaded, texts=texts, queries=queries, k=k)
    recall = (float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, ids)])) if truth is not None
              else 1.0 if kind == "exact" else None)  # None: no exact run this time to compare with
    faiss_file = col.database.path / "_faiss" / sidecar["files"]["index"]  # each build names its own files
    row = {"size": n, "kind": kind, "factory": sidecar["factory"], "nprobe": sidecar["nprobe"],
           "build_seconds": build_s, "load_seconds": load_s,
           "load_seconds_fresh_process": child["seconds"], "index_file_mb": faiss_file.stat().st_size / 2**20,
           "index_file_mb_per_m": faiss_file.stat().st_size / 2**20 * per_m,
           "memory": mem, "text_to_image": pct(t2i), "raw_faiss": pct(raw), "clipdex_search_vector": pct(ours),
           "overhead_p50": float(np.median(ours) / np.median(raw)),
           "overhead_p95": float(np.percentile(ours, 95) / np.percentile(raw, 95)),
           "recall_at_10_heldout": recall, "recall_at_10_sidecar": sidecar["recall_at_10_vs_exact"], "ids": ids}
    del loaded, sc
    gc.collect()
    return row


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    """The results table, to stdout."""
    head = (f"{'size':>8} {'index':<15} {'build s':>8} {'load s':>7} {'MB/M file':>9} {'MB/M rss':>9} {'MB/M peak':>9} "
            f"{'t2i p50/p95 ms':>15} {'raw p50/p95 ms':>15} {'clipdex p50/p95':>16} {'overhd':>6} "
            f"{'R@10 held':>9} {'R@10 self':>9}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        m = r["memory"]
        lat = lambda d: f"{d['p50_ms']:.2f}/{d['p95_ms']:.2f}"  # noqa: E731
        print(f"{r['size']:>8} {r['factory']:<15} {r['build_seconds']:>8.2f} {r['load_seconds']:>7.2f} "
              f"{r['index_file_mb_per_m']:>9.0f} {_f(m['rss_growth_mb_per_m'], '9.0f')} "
              f"{_f(m['peak_growth_mb_per_m'], '9.0f')} "
              f"{lat(r['text_to_image']):>15} {lat(r['raw_faiss']):>15} {lat(r['clipdex_search_vector']):>16} "
              f"{r['overhead_p50']:>6.2f} {_f(r['recall_at_10_heldout'], '9.3f')} {r['recall_at_10_sidecar']:>9.3f}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and writes the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = ap.add_argument
    arg("--sizes", default="10000,100000,1000000", help="collection sizes (default %(default)s)")
    arg("--model", default="clipdex-world", help="encoder of the text queries and the collection (%(default)s)")
    arg("--queries", type=int, default=200, help="queries per measurement (default %(default)s)")
    arg("--k", type=int, default=10, help="results per query (default %(default)s)")
    arg("--centres", type=int, default=1000, help="gaussian clusters (default %(default)s)")
    arg("--noise", type=float, default=1.5, help="noise norm relative to a centre's (1.5: cosine ~0.55 to it)")
    arg("--nprobe", type=int, default=32, help="IVF lists visited per query (default %(default)s)")
    arg("--max-nlist", type=int, default=0, help="IVF lists = min(4*sqrt(N) (the library default), this); 0 (the "
        "default): no cap. At 1M, no cap trains 4000 lists on all 1M vectors (~2 min); 1024: on a 262k sample")
    arg("--kinds", default="exact,approx,compressed", help="index kinds to measure (default %(default)s); exact "
        "is the recall truth of the others")
    arg("--compressed-sizes", default="1000000", help="sizes at which 'compressed' (IVF-PQ) is measured too "
        "(default %(default)s)")
    arg("--pq-bytes", type=int, default=IndexConfigDefaults.pq_bytes, help="code bytes per vector of the compressed "
        "index (default %(default)s, the library's)")
    arg("--chunk", type=int, default=100_000, help="rows per LanceDB append (default %(default)s)")
    arg("--seed", type=int, default=0, help="data seed (default 0)")
    arg("--threads", type=int, default=None, help="torch and FAISS threads (default: theirs, all cores)")
    arg("--work", default="/tmp/clipdex-bench", help="the database is WORK/search-db; collections are reused")
    arg("--fresh", action="store_true", help="delete WORK/search-db first")
    arg("--out", default=str(Path(__file__).parent / "results" / "search_latency.json"),
        help="JSON report (default bench/results/search_latency.json)")
    args = ap.parse_args(argv)

    import faiss
    import torch

    from clipdex.retrieval.models.encoder import load_encoder
    from clipdex.retrieval.store.faiss_index import IndexConfig
    from clipdex.retrieval.store.record import Database

    set_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    compressed_sizes = {int(s) for s in args.compressed_sizes.split(",") if s.strip()}
    wanted = {k.strip() for k in args.kinds.split(",") if k.strip()}
    db_path = Path(args.work) / "search-db"
    if args.fresh:
        shutil.rmtree(db_path, ignore_errors=True)
    db = Database(db_path, create=True)
    encoder = load_encoder(args.model)
    info = encoder.info
    centres = np.random.default_rng([args.seed, 0]).standard_normal((args.centres, info.embed_dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)  # the cluster centres: random unit vectors
    queries = mixture(centres=centres, count=args.queries, noise=args.noise, rng=np.random.default_rng([args.seed, 2]))
    texts = captions(n=args.queries, seed=args.seed)
    print(f"synthetic data: {info.embed_dim}-d L2-normalised vectors, a mixture of {args.centres} gaussian clusters "
          f"(noise norm {args.noise} x centre), seed {args.seed}; queries: {args.queries} held-out vectors from the "
          f"same mixture, and captions such as {texts[0]!r} embedded by {args.model} in-process", flush=True)
    rows = []
    for n in sizes:
        name = f"synth-{n}-d{info.embed_dim}-c{args.centres}-z{round(args.noise * 100)}-s{args.seed}"
        col, write_s = ensure_collection(db=db, name=name, info=info, size=n, centres=centres, noise=args.noise,
                                         seed=args.seed, chunk=args.chunk)
        print(f"[{n}] {'wrote' if write_s else 'reused'} {name} ({write_s:.1f} s)", flush=True)
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # the library default (IndexConfig.factory_for)
        nlist = min(nlist, args.max_nlist) if args.max_nlist else nlist
        kinds = [("exact", IndexConfig(exact_threshold=n)),
                 ("approx", IndexConfig(exact_threshold=0, compressed_threshold=2**62, factory=f"IVF{nlist},Flat",
                                        nprobe=args.nprobe))]
        if n in compressed_sizes:  # the library's compressed factory, {m} filled by it from D and pq_bytes
            kinds.append(("compressed", IndexConfig(exact_threshold=0, compressed_threshold=0, nprobe=args.nprobe,
                                                    pq_bytes=args.pq_bytes,
                                                    compressed_factory=IndexConfigDefaults.compressed_factory.replace(
                                                        "{nlist}", str(nlist)))))
        kinds = [(kind, config) for kind, config in kinds if kind in wanted]
        truth = None
        for kind, config in kinds:
            print(f"[{n}] {kind}: build, load, {args.queries} text + {args.queries} vector queries ...", flush=True)
            row = bench_kind(col=col, kind=kind, config=config, encoder=encoder, texts=texts, queries=queries,
                             k=args.k, truth=truth)
            ids, row["write_seconds"] = row.pop("ids"), write_s
            truth = ids if kind == "exact" else truth
            rows.append(row)
    print()
    print_table(rows)
    rule = f"min(4*sqrt(N), {args.max_nlist})" if args.max_nlist else "4*sqrt(N) (the library default)"
    print(f"\nMB/M: resident-memory growth while loading the index (load_for, in a fresh process), per million "
          f"vectors (raw float32 vectors: {4 * info.embed_dim} MB/M); peak: the high-water mark during the load.\n"
          f"overhd = clipdex search_vector p50 / raw FAISS p50 (target <= 1.2). R@10 held: IVF vs exact top-10 on the "
          f"held-out query vectors; self: the sidecar's recall (collection vectors as queries).\n"
          f"IVF: nlist = {rule}, nprobe {args.nprobe}, trained on min(N, 64 * nlist) vectors (IVF-PQ: at least "
          f"65,536). MB/M file: the index file per million vectors. torch threads "
          f"{torch.get_num_threads()}, FAISS threads {faiss.omp_get_max_threads()}, cores {os.cpu_count()}.")
    report = {"benchmark": "search_latency", "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:],
              "machine": machine(),
              "data": {"dim": info.embed_dim, "centres": args.centres, "noise": args.noise, "seed": args.seed,
                       "queries": args.queries, "k": args.k, "example_captions": texts[:5]},
              "results": rows}
    write_report(report, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
