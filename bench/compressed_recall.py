"""Recall, size and build time of candidate compressed indexes (the factory above ``IndexConfig.compressed_threshold``).

Reads the synthetic collection ``bench/search_latency.py`` left in WORK/search-db (run it first with the same --size)
and its held-out queries with their exact top 10 (``pq_recall.held_out``, same seed), then for each FAISS factory
string given: trains it on 64 * nlist sampled vectors and adds every vector (--threads FAISS threads), searches the
queries one at a time on one thread at --nprobe, and prints train and add seconds, the serialized index's bytes per
vector, recall@10 against exact search and the p50 / p95 of the raw search. Nothing is persisted.

    .venv/bin/python bench/compressed_recall.py --size 1000000 "IVF{nlist},SQ8" "IVF{nlist},PQ128x8"   # ~7 min
    .venv/bin/python bench/compressed_recall.py --size 100000 "IVF{nlist},SQ8"                        # ~15 s
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from common import set_threads
from pq_recall import collection_name, held_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("factories", nargs="+", help='FAISS factory strings, {nlist} filled in (e.g. "IVF{nlist},SQ8")')
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--work", default="/tmp/clipdex-bench-pq")
    ap.add_argument("--nlist", type=int, default=None, help="inverted lists (default: the library's, 4 sqrt(N))")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="FAISS threads for train and add (search uses one)")
    args = ap.parse_args(argv)

    import faiss

    from clipdex.retrieval.store.faiss_index import IndexConfig
    from clipdex.retrieval.store.record import Database

    set_threads(args.threads)
    # the library's rule, read from it: an IVF factory string of just "{nlist}"
    nlist = args.nlist or int(IndexConfig(exact_threshold=0, compressed_threshold=2**62, factory="{nlist}")
                              .factory_for(args.size, dim=None))
    col = Database(Path(args.work) / "search-db").open(
        collection_name(size=args.size, centres=args.centres, noise=args.noise, seed=args.seed))
    t0 = time.perf_counter()
    x, q, truth = held_out(col=col, centres=args.centres, noise=args.noise, seed=args.seed, queries=args.queries)
    print(f"read + exact top 10 {time.perf_counter() - t0:.2f} s {x.shape}; nlist {nlist}, nprobe {args.nprobe}, "
          f"{len(q)} held-out queries", flush=True)
    sample = x[np.random.default_rng(args.seed).choice(len(x), min(len(x), 64 * nlist), replace=False)]
    for factory in args.factories:
        index = faiss.index_factory(x.shape[1], factory.format(nlist=nlist), faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        index.train(sample)
        train_s, t0 = time.perf_counter() - t0, time.perf_counter()
        index.add(x)
        add_s = time.perf_counter() - t0
        faiss.extract_index_ivf(index).nprobe = args.nprobe
        faiss.omp_set_num_threads(1)
        times, found = [], []
        for v in q:
            t0 = time.perf_counter()
            _, pos = index.search(v[None], 10)
            times.append(time.perf_counter() - t0)
            found.append(pos[0])
        set_threads(args.threads)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
        per_vec = faiss.serialize_index(index).nbytes / len(x)
        print(f"{factory}: train {train_s:.1f}s add {add_s:.1f}s bytes/vec {per_vec:.1f} recall@10 {recall:.3f} "
              f"p50 {np.median(times) * 1e3:.2f} ms p95 {np.percentile(times, 95) * 1e3:.2f}", flush=True)
        del index
    return 0


if __name__ == "__main__":
    sys.exit(main())
