"""Load on ``clipdex serve``: concurrent clients for a fixed time, mixed text searches, image searches and asks.

Starts ``clipdex serve`` on a free loopback port over the demo collection (``clipdex demo`` builds it first
when it is missing), then ``--clients`` threads, each with its own keep-alive HTTP connection
(``http.client``: the lightest client Python has, since the load generator shares the machine's cores with the
server), send requests back to back for ``--seconds``: a text search (distinct world-style captions), an
image search (by the id of an image in the collection, so no upload), or an ask (an image id and a question),
drawn by ``--mix``. Reported per endpoint: requests, requests/s, p50/p95/p99 latency and errors; the
server's peak RSS (sampled from /proc every 0.2 s); then a cold ``clipdex search`` CLI call's wall time and
the same search through ``curl`` against the running server (median of ``--repeats``).

    .venv/bin/python bench/serve_load.py                     # 8 clients, 30 s (about 2 minutes in all)
    .venv/bin/python bench/serve_load.py --clients 1 --seconds 10
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from common import captions, write_report

CLIPDEX = str(Path(sys.executable).with_name("clipdex"))
QUESTIONS = ["what colour is the circle?", "how many objects are there?", "what shape is on the left?",
             "when was it built?"]


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def start_server(db: Path, *, runtime: str) -> tuple[subprocess.Popen, str]:
    """``clipdex serve`` on a free port; (the process, its base URL) once it listens."""
    proc = subprocess.Popen([CLIPDEX, "serve", "--db", str(db), "--port", "0", "--device", "cpu", "--runtime", runtime],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    while proc.poll() is None:
        line = proc.stderr.readline()
        if "listening on" in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, line.split("listening on ")[1].split()[0]
    raise SystemExit(f"clipdex serve exited with {proc.returncode}")


def requests_for(kind: str, *, collection: str, texts: list[str], ids: list[str], rng: random.Random) -> tuple[str, dict]:
    if kind == "text":
        return "/search", {"collection": collection, "text": rng.choice(texts), "k": 10}
    if kind == "image":
        return "/search", {"collection": collection, "image_id": rng.choice(ids), "k": 10}
    return "/ask", {"collection": collection, "image_id": rng.choice(ids), "question": rng.choice(QUESTIONS), "k": 3}


def client(url: str, *, kinds: list[str], weights: list[float], until: float, seed: int, collection: str,
           texts: list[str], ids: list[str], out: list) -> None:
    """One client: requests back to back on one keep-alive connection until ``until``; appends
    (kind, seconds, status) to ``out``."""
    rng = random.Random(seed)
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    while time.perf_counter() < until:
        kind = rng.choices(kinds, weights)[0]
        path, body = requests_for(kind, collection=collection, texts=texts, ids=ids, rng=rng)
        data = json.dumps(body)
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, data, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException):
            status = -1
            conn.close()
            conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
        out.append((kind, time.perf_counter() - t0, status))
    conn.close()


def wall(cmd: list[str], repeats: int) -> dict:
    """Median and all wall-clock seconds of running ``cmd`` (its output discarded)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return {"median_s": float(np.median(times)), "runs_s": [round(t, 3) for t in times]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="clipdex-data/bench", help="where the demo world is built when missing")
    ap.add_argument("--db", default=None, help="database to serve (default: the demo's, built if missing)")
    ap.add_argument("--collection", default="demo")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--mix", default="text:0.7,image:0.2,ask:0.1", help="kind:weight,... (text, image, ask)")
    ap.add_argument("--runtime", default="torch", choices=["torch", "onnx", "auto"], help="the server's --runtime")
    ap.add_argument("--repeats", type=int, default=3, help="cold CLI and curl runs")
    ap.add_argument("--out", default="bench/results/serve_load.json")
    args = ap.parse_args()

    db = Path(args.db) if args.db else Path(args.work) / "demo-world" / "db"
    if not (db / f"{args.collection}__images.lance").exists():
        print(f"building the demo collection in {db.parent} (clipdex demo)...", flush=True)
        subprocess.run([CLIPDEX, "demo", "--dir", str(db.parent)], check=True, stdout=subprocess.DEVNULL)
    mix = [(k, float(w)) for k, w in (part.split(":") for part in args.mix.split(","))]
    kinds, weights = [k for k, _ in mix], [w for _, w in mix]

    from clipdex.retrieval.store.record import Database

    ids = Database(db).open(args.collection).rows(columns=("id",))["id"].to_pylist()
    texts = captions(n=2000, seed=1)
    t0 = time.perf_counter()
    proc, url = start_server(db, runtime=args.runtime)
    startup = time.perf_counter() - t0
    print(f"server at {url} ready in {startup:.1f} s, RSS {rss_mb(proc.pid):.0f} MB; {args.clients} clients for "
          f"{args.seconds:.0f} s, mix {args.mix}", flush=True)
    peak, stop = [rss_mb(proc.pid)], threading.Event()

    def sample():
        while not stop.wait(0.2):
            peak.append(rss_mb(proc.pid))

    threading.Thread(target=sample, daemon=True).start()
    results: list = []
    try:
        warm = []
        client(url, kinds=kinds, weights=weights, until=time.perf_counter() + 2, seed=999, collection=args.collection,
               texts=texts, ids=ids, out=warm)  # every path once: thread pools, caches, the decoder
        until = time.perf_counter() + args.seconds
        t_start = time.perf_counter()
        threads = [threading.Thread(target=client, kwargs=dict(url=url, kinds=kinds, weights=weights, until=until,
                                                               seed=i, collection=args.collection, texts=texts,
                                                               ids=ids, out=results)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t_start
        stop.set()
        query = "a red circle left of a blue star"
        cold = wall([CLIPDEX, "search", query, "--db", str(db), "--collection", args.collection, "--json"],
                    args.repeats)
        curl = shutil.which("curl")
        via_curl = wall([curl, "-s", "-f", url + "/search", "-H", "Content-Type: application/json", "-d",
                         json.dumps({"collection": args.collection, "text": query, "k": 10})],
                        args.repeats * 3) if curl else None
        server_rss = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    per = {}
    print(f"\n{'endpoint':<8}{'requests':>10}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for kind in kinds:
        rows = [(s, st) for k, s, st in results if k == kind]
        if not rows:
            continue
        lat = np.array([s for s, _ in rows])
        errors = sum(st != 200 for _, st in rows)
        per[kind] = {"requests": len(rows), "per_second": len(rows) / elapsed, "errors": errors,
                     **{f"p{q}_ms": float(np.percentile(lat, q) * 1e3) for q in (50, 95, 99)}}
        r = per[kind]
        print(f"{kind:<8}{r['requests']:>10}{r['per_second']:>9.1f}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}"
              f"{r['p99_ms']:>9.1f}{errors:>8}")
    total = len(results)
    print(f"all     {total:>10}{total / elapsed:>9.1f}   errors {sum(st != 200 for _, _, st in results)}")
    print(f"server RSS: {server_rss:.0f} MB at the end, {max(peak):.0f} MB peak; start-up {startup:.1f} s")
    print(f"cold `clipdex search` CLI: {cold['median_s']:.2f} s wall (median of {args.repeats}: {cold['runs_s']})")
    if via_curl:
        print(f"the same search through curl against the server: {via_curl['median_s'] * 1e3:.1f} ms wall "
              f"(median of {len(via_curl['runs_s'])})")
    report = {"clients": args.clients, "runtime": args.runtime, "seconds": elapsed, "mix": args.mix, "collection": args.collection,
              "images": len(ids), "endpoints": per, "requests": total, "per_second": total / elapsed,
              "errors": sum(st != 200 for _, _, st in results), "server_rss_mb": server_rss,
              "server_peak_rss_mb": max(peak), "startup_s": startup, "cold_cli_search": cold, "curl_search": via_curl,
              "cores": os.cpu_count()}
    write_report(report, Path(args.out))


if __name__ == "__main__":
    main()
