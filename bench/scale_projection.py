"""The scale table: measured rows from search_latency reports, and 10M / 100M projected from the 1M compressed run.

Nothing here is measured: it reads the JSON that ``bench/search_latency.py`` wrote and applies the stated arithmetic.
The index type at each projected size is the one ``IndexConfig().factory_for`` returns (the library decides).

    .venv/bin/python bench/scale_projection.py      # bench/results/search_latency.json + search_latency-pq.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def index_bytes(factory: str, *, n: int, dim: int) -> dict:
    """Bytes of a FAISS index of ``n`` vectors built by ``factory`` (Flat, IVF{nlist},Flat or IVF{nlist},PQ{m}x8):
    per-vector codes and ids, and the fixed coarse centroids and PQ codebooks."""
    if factory == "Flat":
        return {"codes": n * 4 * dim, "ids": 0, "fixed": 0}
    nlist = int(re.match(r"IVF(\d+),", factory).group(1))
    pq = re.search(r"PQ(\d+)x(\d+)", factory)
    code = int(pq.group(1)) * int(pq.group(2)) // 8 if pq else 4 * dim
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
    ap.add_argument("--sizes", default="10000000,100000000", help="projected sizes (default %(default)s)")
    args = ap.parse_args(argv)

    from clipdex.retrieval.store.faiss_index import IndexConfig

    default, comp = json.loads(Path(args.default).read_text()), json.loads(Path(args.compressed).read_text())
    dim, config = comp["data"]["dim"], IndexConfig()
    rows = [r for r in default["results"] if r["factory"] == config.factory_for(r["size"], dim=dim)]
    rows += [r for r in comp["results"] if r["kind"] == "compressed"]
    pq = max((r for r in comp["results"] if r["kind"] == "compressed"), key=lambda r: r["size"])
    print(f"measured (the default index at each size: {args.default}; the compressed one: {args.compressed}, "
          f"FAISS threads {comp['machine'].get('faiss_threads')}):")
    print(f"{'size':>11} {'index':<16} {'build s':>8} {'MB/M file':>9} {'MB/M rss':>9} {'raw p50/p95 ms':>15} "
          f"{'clipdex p50/p95':>16} {'R@10 held':>9}")
    for r in rows:
        lat = lambda d: f"{d['p50_ms']:.2f}/{d['p95_ms']:.2f}"  # noqa: E731
        print(f"{r['size']:>11,} {r['factory']:<16} {r['build_seconds']:>8.1f} {file_mb_per_m(r):>9.0f} "
              f"{r['memory']['rss_growth_mb_per_m']:>9.0f} {lat(r['raw_faiss']):>15} "
              f"{lat(r['clipdex_search_vector']):>16} {r['recall_at_10_heldout']:>9.3f}")
    # what clipdex keeps beside the index (ids and paths as Arrow and Python lists), measured at 1M
    rows_mb_per_m = pq["memory"]["rss_growth_mb_per_m"] - file_mb_per_m(pq)
    print(f"\nprojected (arithmetic on the {pq['size']:,}-vector compressed run; not measured):")
    print(f"{'size':>11} {'index':<18} {'index MiB/M':>11} {'index GiB':>9} {'+ rows GiB':>10} {'build GiB':>9} "
          f"{'build h (N .. N^1.5)':>20} {'R@10 at 1M':>10}")
    for n in (int(s) for s in args.sizes.split(",")):
        factory = config.factory_for(n, dim=dim)
        b = index_bytes(factory, n=n, dim=dim)
        per_m = (b["codes"] + b["ids"] + b["fixed"]) / n * 1e6 / 2**20
        scale = n / pq["size"]
        lo, hi = pq["build_seconds"] * scale / 3600, pq["build_seconds"] * scale**1.5 / 3600
        print(f"{n:>11,} {factory:<18} {per_m:>11.1f} {per_m * n / 1e6 / 1024:>9.1f} "
              f"{rows_mb_per_m * n / 1e6 / 1024:>10.1f} {n * 4 * dim / 2**30:>9.1f} {f'{lo:.1f} .. {hi:.1f}':>20} "
              f"{pq['recall_at_10_heldout']:>10.3f}")
    print(f"\nindex MB/M = code bytes + 8-byte id per vector + (coarse centroids nlist x {dim} x 4 B + PQ codebooks) "
          f"/ N; "
          f"rows = the ids and paths clipdex holds beside the index, {rows_mb_per_m:.0f} MB/M at 1M (rss growth minus "
          f"the index file; short synthetic paths); build GB = the float32 vectors build_for reads into memory; "
          f"build h: the 1M build ({pq['build_seconds']:.0f} s) scaled by N (training on a sample, reading, encoding) "
          f"to N^1.5 (assigning each vector to 4 sqrt(N) flat centroids); R@10: held-out recall at 1M, nprobe "
          f"{pq['nprobe']} (lower at the same nprobe as N grows).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
