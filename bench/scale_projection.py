"""The scale table: measured rows from search_latency reports, and 10M / 100M projected from the 1M compressed runs.

Nothing here is measured: it reads the JSON that ``bench/search_latency.py`` wrote (the default index to 1M, and the
opt-in IVF-PQ64 at 1M, whose resident memory gives the rows' MB/M), the 1M IVF-SQ8 line ``bench/compressed_recall.py``
printed (train and add seconds, recall), and applies the stated arithmetic. The index type at each projected size is
the one ``IndexConfig().factory_for`` returns (the library decides: IVF-SQ8).

    .venv/bin/python bench/scale_projection.py      # results/search_latency.json, -pq.json, compressed_recall-1m.txt
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def index_bytes(factory: str, *, n: int, dim: int) -> dict:
    """Bytes of a FAISS index of ``n`` vectors built by ``factory`` (Flat, IVF{nlist},Flat, IVF{nlist},SQ8 or
    IVF{nlist},PQ{m}x8): per-vector codes and ids, and the fixed coarse centroids and PQ codebooks."""
    if factory == "Flat":
        return {"codes": n * 4 * dim, "ids": 0, "fixed": 0}
    nlist = int(re.match(r"IVF(\d+),", factory).group(1))
    pq = re.search(r"PQ(\d+)x(\d+)", factory)
    code = int(pq.group(1)) * int(pq.group(2)) // 8 if pq else dim if factory.endswith(",SQ8") else 4 * dim
    books = int(pq.group(1)) * 2 ** int(pq.group(2)) * (dim // int(pq.group(1))) * 4 if pq else 0
    return {"codes": n * code, "ids": n * 8, "fixed": nlist * dim * 4 + books}


def file_mb_per_m(row: dict) -> float:
    """The index file's MB per million vectors (older reports have only the file's MB)."""
    return row["index_file_mb"] * 1e6 / row["size"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--default", default=str(RESULTS / "search_latency.json"), help="report with the default index")
    ap.add_argument("--compressed", default=str(RESULTS / "search_latency-pq.json"), help="report with the 1M "
                    "compressed run")
    ap.add_argument("--sq8", default=str(RESULTS / "compressed_recall-1m.txt"), help="compressed_recall.py's 1M "
                    "output (its IVF{nlist},SQ8 line)")
    ap.add_argument("--sizes", default="10000000,100000000", help="projected sizes (default %(default)s)")
    args = ap.parse_args(argv)

    from clipdex.retrieval.store.faiss_index import IndexConfig

    default, comp = json.loads(Path(args.default).read_text()), json.loads(Path(args.compressed).read_text())
    dim, config = comp["data"]["dim"], IndexConfig()
    rows = [r for r in default["results"] if r["factory"] == config.factory_for(r["size"], dim=dim)]
    rows += [r for r in comp["results"] if r["kind"] == "compressed"]
    pq = max((r for r in comp["results"] if r["kind"] == "compressed"), key=lambda r: r["size"])
    sq8 = {k: float(v) for k, v in re.search(r"IVF\{nlist\},SQ8: train (?P<train>[\d.]+)s add (?P<add>[\d.]+)s "
                                             r"bytes/vec (?P<bytes>[\d.]+) recall@10 (?P<recall>[\d.]+)",
                                             Path(args.sq8).read_text()).groupdict().items()}
    print(f"measured (the default index at each size: {args.default}; the compressed one: {args.compressed}, "
          f"FAISS threads {comp['machine'].get('faiss_threads')}):")
    print(f"{'size':>11} {'index':<16} {'build s':>8} {'MB/M file':>9} {'MB/M rss':>9} {'raw p50/p95 ms':>15} "
          f"{'clipdex p50/p95':>16} {'R@10 held':>9}")
    for r in rows:
        lat = lambda d: f"{d['p50_ms']:.2f}/{d['p95_ms']:.2f}"  # noqa: E731
        print(f"{r['size']:>11,} {r['factory']:<16} {r['build_seconds']:>8.1f} {file_mb_per_m(r):>9.0f} "
              f"{r['memory']['rss_growth_mb_per_m']:>9.0f} {lat(r['raw_faiss']):>15} "
              f"{lat(r['clipdex_search_vector']):>16} {r['recall_at_10_heldout']:>9.3f}"
              f"{'  (PQ: the opt-in)' if 'PQ' in r['factory'] else ''}")
    print(f"{1_000_000:>11,} {'IVF4000,SQ8':<16} {sq8['train'] + sq8['add']:>8.1f} {sq8['bytes']:>9.0f} "
          f"{'n/m':>9} {'':>15} {'':>16} {sq8['recall']:>9.3f}  (compressed_recall.py: train + add only, 2 threads)")
    # what clipdex keeps beside the index (ids and paths as Arrow and Python lists), measured at 1M
    rows_mb_per_m = pq["memory"]["rss_growth_mb_per_m"] - file_mb_per_m(pq)
    print("\nprojected (arithmetic on the 1M IVF-SQ8 run and the 1M PQ run's rows memory; not measured):")
    print(f"{'size':>11} {'index':<18} {'index MiB/M':>11} {'index GiB':>9} {'+ rows GiB':>10} {'build GiB':>9} "
          f"{'train + add min':>15} {'R@10 at 1M':>10}")
    for n in (int(s) for s in args.sizes.split(",")):
        factory = config.factory_for(n, dim=dim)
        b = index_bytes(factory, n=n, dim=dim)
        per_m = (b["codes"] + b["ids"] + b["fixed"]) / n * 1e6 / 2**20
        scale = n / 1e6
        train, add = sq8["train"] * scale / 60, sq8["add"] * scale**1.5 / 60
        print(f"{n:>11,} {factory:<18} {per_m:>11.1f} {per_m * n / 1e6 / 1024:>9.1f} "
              f"{rows_mb_per_m * n / 1e6 / 1024:>10.1f} {n * 4 * dim / 2**30:>9.1f} {f'{train:.0f} + {add:.0f}':>15} "
              f"{sq8['recall']:>10.3f}")
    print(f"\nindex MB/M = code bytes ({dim} for SQ8) + 8-byte id per vector + (coarse centroids nlist x {dim} x 4 B "
          f"+ PQ codebooks) / N; "
          f"rows = the ids and paths clipdex holds beside the index, {rows_mb_per_m:.0f} MB/M at 1M (rss growth minus "
          f"the index file; short synthetic paths); build GB = the float32 vectors build_for reads into memory; "
          f"train + add (2 threads): the 1M SQ8 training ({sq8['train']:.0f} s) scaled by N (64 nlist points x nlist "
          f"centroids = 1024 N) and its add ({sq8['add']:.1f} s) by N^1.5 (each vector against 4 sqrt(N) flat "
          f"centroids), reading and the recall check not included; R@10: held-out recall at 1M, nprobe "
          f"{pq['nprobe']} (lower at the same nprobe as N grows).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
