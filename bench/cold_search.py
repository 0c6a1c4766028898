"""A cold ``clipdex search`` (a fresh process, as a user types it): wall time and peak RSS, per runtime.

Over the demo collection (``clipdex demo`` builds it when missing; its index run makes the text tower's ONNX
export, once per model), runs ``clipdex search QUERY --json`` ``--repeats`` times for each query with the default
runtime (``auto``: the cached text export, no PyTorch) and with ``--runtime torch``, each as its own process:
wall seconds from spawn to exit and the child's peak RSS (``wait4``). Prints the medians and whether both runtimes
returned the same ids (and the largest score difference). Then the write side: a no-op re-index of the demo's
corpus (nothing to embed: the model must not load) and, into a scratch collection, how long ``index`` takes to
start embedding (the CLI's start, timed as ``clipdex index --help``, plus the run's own ``to_first_batch``: read,
plan, model load, the first batch's decode), with the export cached and, in an empty cache, without.

    .venv/bin/python bench/cold_search.py                  # about a minute once the demo exists
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import write_report

CLIPDEX = str(Path(sys.executable).with_name("clipdex"))
QUERIES = ("a red circle left of a star", "two small green squares", "a large yellow hexagon with stripes")


def timed(cmd: list[str], *, env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of running ``cmd`` to its end in a fresh process (its output goes to
    files, so the process is reaped by ``wait4``, which gives its own peak RSS)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{err.read().decode()}")
        return wall, usage.ru_maxrss / 1024, out.read().decode()


def run_search(db: Path, collection: str, query: str, runtime: str | None) -> tuple[float, float, dict]:
    cmd = [CLIPDEX, "search", query, "--db", str(db), "--collection", collection, "--json"]
    wall, rss, out = timed(cmd + (["--runtime", runtime] if runtime else []))
    return wall, rss, json.loads(out)


def start_embedding(source: str, split: str | None, db: Path, env: dict, *, cli_start: float) -> dict:
    """Index ``source`` into a new scratch collection: seconds from the call to the first batch's embedding (the
    CLI's own start, ``cli_start``, plus the run's ``to_first_batch``: read, plan, model load, first decode)."""
    cmd = [CLIPDEX, "index", source, "--db", str(db), "--collection", "scratch", "--json"]
    wall, _, out = timed(cmd + (["--split", split] if split else []), env=env)
    s = json.loads(out.strip().splitlines()[-1])["seconds"]
    return {"to_first_batch_s": cli_start + s["to_first_batch"], "cli_start_s": cli_start, "read_s": s["read"],
            "plan_s": s["plan"], "load_model_s": s.get("load_model"), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="clipdex-data/bench", help="where the demo world is built when missing")
    ap.add_argument("--collection", default="demo")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/cold_search.json")
    args = ap.parse_args()
    world = Path(args.work) / "demo-world"
    db = world / "db"
    if not (db / f"{args.collection}__images.lance").is_dir():
        print(f"building the demo collection in {world} ...")
        subprocess.run([CLIPDEX, "demo", "--dir", str(world)], check=True, stdout=subprocess.DEVNULL)
    source = str(world / "manifest.parquet")

    report = {"collection": str(db), "repeats": args.repeats, "cores": os.cpu_count(), "search": {}}
    results = {}
    for runtime in ("auto", "torch"):
        walls, rss = [], []
        for q in QUERIES:
            for _ in range(args.repeats):
                w, r, hits = run_search(db, args.collection, q, None if runtime == "auto" else runtime)
                walls.append(w)
                rss.append(r)
            results.setdefault(q, {})[runtime] = hits["results"]
        report["search"][runtime] = {"wall_median_s": float(np.median(walls)), "wall_max_s": float(np.max(walls)),
                                     "rss_median_mb": float(np.median(rss)), "rss_max_mb": float(np.max(rss)),
                                     "runs": len(walls)}
    same = all([h["id"] for h in r["auto"]] == [h["id"] for h in r["torch"]] for r in results.values())
    diff = max(abs(a["score"] - b["score"]) for r in results.values() for a, b in zip(r["auto"], r["torch"]))
    report["same_ids"], report["max_score_diff"] = same, diff

    wall, rss, out = timed([CLIPDEX, "index", source, "--split", "corpus", "--db", str(db), "--collection",
                            args.collection, "--json"])
    noop = json.loads(out.strip().splitlines()[-1])
    report["noop_reindex"] = {"wall_s": wall, "rss_mb": rss, "indexed": noop["counts"]["indexed"],
                              "model_loaded": "load_model" in noop["seconds"]}
    cli_start = float(np.median([timed([CLIPDEX, "index", "--help"])[0] for _ in range(3)]))
    scratch = Path(tempfile.mkdtemp(prefix="clipdex-cold-"))
    try:
        cached = start_embedding(source, "corpus", scratch / "db-a", dict(os.environ), cli_start=cli_start)
        empty = {**os.environ, "CLIPDEX_CACHE": str(scratch / "cache")}
        first = start_embedding(source, "corpus", scratch / "db-b", empty, cli_start=cli_start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["index_start"] = {"export_cached": cached, "first_export": first}

    print(f"\ncold `clipdex search` ({len(QUERIES)} queries x {args.repeats} runs each, one process each, "
          f"{os.cpu_count()} cores):")
    print(f"{'runtime':<10}{'wall p50':>10}{'max':>8}{'RSS p50':>10}{'max':>8}")
    for name, r in report["search"].items():
        print(f"{name:<10}{r['wall_median_s']:>9.2f}s{r['wall_max_s']:>7.2f}s{r['rss_median_mb']:>8.0f}MB"
              f"{r['rss_max_mb']:>6.0f}MB")
    print(f"same ids both ways: {same}; largest score difference {diff:.2e}")
    n = report["noop_reindex"]
    print(f"no-op re-index: {n['wall_s']:.2f} s wall, {n['indexed']} indexed, model loaded: {n['model_loaded']}")
    for name, r in report["index_start"].items():
        print(f"index: call to first batch ({name.replace('_', ' ')}): {r['to_first_batch_s']:.2f} s = CLI start "
              f"{r['cli_start_s']:.2f} + read {r['read_s']:.2f} + plan {r['plan_s']:.2f} + model load "
              f"{r['load_model_s']:.2f} + first decode")
    write_report(report, Path(args.out))


if __name__ == "__main__":
    main()
