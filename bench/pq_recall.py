"""What buys back the recall IVF-PQ loses: more lists probed, and an exact re-rank of more candidates.

Reads the collection and the IVF-PQ index (``IVF{nlist},PQ64x8``, the compressed default before IVF-SQ8)
``bench/search_latency.py`` left in WORK/search-db (run it first with the same --size, from when its compressed kind
was PQ), the same held-out queries (same seed), and for each nprobe and re-rank depth R: recall@10 against
exact search and the p50 of the raw FAISS search for the R candidates. The re-rank scores the R candidates with their
exact float32 vectors (here from memory); then it times reading 100 candidates' vectors from LanceDB by id, the
read clipdex would need to re-rank today.

    .venv/bin/python bench/pq_recall.py --size 1000000 --threads 1
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from common import set_threads
from search_latency import mixture

PQ_FACTORY = "IVF{nlist},PQ{m}x8"  # the index this script reads (pq_bytes 64: PQ64x8 at 256-d)


def collection_name(*, size: int, centres: int, noise: float, seed: int) -> str:
    """The name ``bench/search_latency.py`` gives its synthetic collection."""
    return f"synth-{size}-d256-c{centres}-z{round(noise * 100)}-s{seed}"


def held_out(*, col, centres: int, noise: float, seed: int, queries: int):
    """(x, q, truth): the collection's vectors, search_latency's held-out queries (same seed) and their exact top 10."""
    import faiss

    x, _ = col.vectors("images", [])
    d = x.shape[1]
    c = np.random.default_rng([seed, 0]).standard_normal((centres, d), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    q = mixture(centres=c, count=queries, noise=noise, rng=np.random.default_rng([seed, 2]))
    exact = faiss.IndexFlatIP(d)
    exact.add(x)
    _, truth = exact.search(q, 10)
    return x, q, truth


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nprobes", default="32,64,128")
    ap.add_argument("--depths", default="10,50,100,200", help="candidates re-ranked exactly (10: no re-rank)")
    ap.add_argument("--lance-reads", type=int, default=21, help="queries whose candidates are read from LanceDB")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default="/tmp/clipdex-bench")
    args = ap.parse_args(argv)

    import faiss

    from clipdex.retrieval.store.faiss_index import IndexConfig, load_for
    from clipdex.retrieval.store.record import Database

    set_threads(args.threads)
    col = Database(Path(args.work) / "search-db").open(
        collection_name(size=args.size, centres=args.centres, noise=args.noise, seed=args.seed))
    nlist = max(1, min(int(4 * math.sqrt(args.size)), args.size // 39))
    config = IndexConfig(exact_threshold=0, compressed_threshold=0,
                         compressed_factory=PQ_FACTORY.replace("{nlist}", str(nlist)), use_gpu=False)
    loaded = load_for(col, "images", config=config, rebuild_stale=False)  # the index search_latency persisted
    x, q, truth = held_out(col=col, centres=args.centres, noise=args.noise, seed=args.seed, queries=args.queries)
    ivf = faiss.extract_index_ivf(loaded.index)
    print(f"{loaded.sidecar['factory']} over {len(x):,} vectors, {args.queries} held-out queries, FAISS threads "
          f"{faiss.omp_get_max_threads()}")
    print(f"{'nprobe':>6} {'depth R':>7} {'R@10':>6} {'raw p50 ms':>10}")
    for nprobe in (int(s) for s in args.nprobes.split(",")):
        ivf.nprobe = nprobe
        for depth in (int(s) for s in args.depths.split(",")):
            times, found = [], []
            for v in q:
                t0 = time.perf_counter()
                _, pos = loaded.index.search(v[None], depth)
                times.append(time.perf_counter() - t0)
                cand = pos[0][pos[0] >= 0]
                found.append(cand[np.argsort(-(x[cand] @ v))[:10]] if depth > 10 else cand[:10])
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)])
            print(f"{nprobe:>6} {depth:>7} {recall:>6.3f} {np.median(times) * 1e3:>10.2f}", flush=True)
    # what reading the candidates' exact vectors from LanceDB by id would cost today (no scalar index on id)
    ids = loaded.columns["id"]
    reads = []
    for v in q[:args.lance_reads]:
        _, pos = loaded.index.search(v[None], 100)
        t0 = time.perf_counter()
        col.rows([ids[p] for p in pos[0] if p >= 0], columns=("id", "vector"))
        reads.append(time.perf_counter() - t0)
    print(f"LanceDB Collection.rows of the 100 candidates' vectors by id: first {reads[0] * 1e3:.0f} ms, then p50 "
          f"{np.median(reads[1:]) * 1e3:.0f} ms, max {max(reads[1:]) * 1e3:.0f} ms over {len(reads) - 1} queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
