"""Fault injection: what clipdex keeps, loses and says under kills, two writers, damaged files, a read-only
database and a full disk. Prints one line per fault and a JSON record; RELIABILITY.md quotes its output.

World: a generated manifest of N images with 5 captions each (v1), and an edit of it (v2: 10% of rows gone,
20% with new captions) so that incremental runs replace and delete. References: v1 indexed, then v2
indexed on top, uninterrupted. Kills: real ``clipdex index`` processes with a small flush size (16 images per
commit, so kills land on commits), SIGKILLed at a random moment of the run (uniform over the clean run's
length), or the moment a FAISS temporary file appears (a kill during the FAISS write). After each kill:
``clipdex check``, then the same command to completion; the final rows must equal the reference (same ids,
bit-identical vectors, FAISS rows = LanceDB rows, same top-10 for 20 queries).

    .venv/bin/python bench/faults.py                      # 600 images, 20 kills
    .venv/bin/python bench/faults.py --images 200 --kills 6
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

CLIPDEX = [sys.executable, "-m", "clipdex"]
FLAGS = ["--collection", "c", "--batch-size", "16", "--flush-rows", "16", "--workers", "1", "--no-progress"]


def run(*args: str) -> int:
    """``clipdex`` in this process (quiet), returning its exit code."""
    import contextlib
    import io

    from clipdex.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(list(args))


def check(db: Path) -> dict:
    """``clipdex check --json`` in this process: its exit code and the problems it names."""
    import contextlib
    import io

    from clipdex.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["check", "--db", str(db), "--json"])
    report = json.loads(out.getvalue() or "{}")
    return {"exit": code, "problems": [p for c in report.get("collections", []) for p in c["problems"]]}


def make_world(work: Path, images: int, seed: int):
    """The manifest path runs index (one path: a source is known by it) and its two contents, v1 and v2
    (v2: 10% of rows dropped, 20% re-captioned). The path sits beside the images: its paths are relative."""
    import pyarrow as pa

    out = work / "world"
    if not (out / "manifest.parquet").exists():
        subprocess.run([*CLIPDEX, "world", "generate", "--out", str(out), "--seed", str(seed), "--train", "0",
                        "--test", str(images), "--corpus", "0", "--landmarks", "0", "--views", "0", "--no-progress",
                        "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    v1 = pq.read_table(out / "manifest.parquet")
    rng = np.random.default_rng(seed)
    rows = v1.filter(rng.random(v1.num_rows) >= 0.1).to_pylist()
    for r in rows:
        if rng.random() < 0.2:
            r["captions"] = [c + " (edited)" for c in r["captions"]]
    return out / "source.parquet", v1, pa.Table.from_pylist(rows, schema=v1.schema)


def snapshot(db: Path) -> dict:
    """Ids and vectors of both tables (sorted by id), FAISS sizes and top-10s for fixed queries."""
    from clipdex.retrieval.store.record import Database
    from clipdex.retrieval.store.search import SearchCollection

    col = Database(db).open("c")
    out = {}
    for table in ("images", "captions"):
        vec, rows = col.vectors(table, ["id"])
        ids = rows["id"].to_pylist()
        order = np.argsort(ids)
        out[table] = ([ids[i] for i in order], vec[order])
    sc = SearchCollection(col)
    out["faiss_rows"] = {t: sc.index(t).index.ntotal for t in ("images", "captions")}
    queries = out["images"][1][:: max(1, len(out["images"][0]) // 20)][:20]
    out["top10"] = [[h.id for h in sc.search_vector(q, k=10)] for q in queries]
    return out


def same(a: dict, b: dict) -> dict:
    """How snapshot ``a`` compares with reference ``b``."""
    return {
        "same_ids": all(a[t][0] == b[t][0] for t in ("images", "captions")),
        "bit_identical": all(a[t][0] == b[t][0] and np.array_equal(a[t][1], b[t][1]) for t in ("images", "captions")),
        "faiss_equals_lance": all(a["faiss_rows"][t] == len(a[t][0]) for t in ("images", "captions")),
        "same_top10": a["top10"] == b["top10"],
        "duplicates": sum(len(a[t][0]) - len(set(a[t][0])) for t in ("images", "captions")),
    }


def rows_now(db: Path) -> int:
    from clipdex.retrieval.store.record import Database

    try:
        return Database(db).open("c").count()
    except Exception:  # noqa: BLE001 - killed before the collection existed
        return 0


def kill_trial(*, manifest: Path, db: Path, at: float | None = None, rows: int | None = None,
               below: int | None = None) -> dict:
    """Start an index run and SIGKILL it ``at`` seconds in (counted from when the collection first holds fewer
    than ``below`` images, if given), or once ``rows`` image rows are committed, or (none of them) the moment
    a FAISS temp file appears."""
    proc = subprocess.Popen([*CLIPDEX, "index", str(manifest), "--db", str(db), *FLAGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    where = ("timed" if below is None else f"{at:.2f} s after its first delete") if at is not None else \
        f"after {rows} rows" if rows is not None else "faiss-write"
    while below is not None and proc.poll() is None and rows_now(db) >= below:
        time.sleep(0.01)
    t_at = time.monotonic()
    while proc.poll() is None:
        if at is not None and time.monotonic() - t_at >= at:
            break
        if rows is not None and rows_now(db) >= rows:
            break
        if at is None and rows is None and (db / "_faiss").is_dir() and any(
                p.suffix == ".tmp" for p in (db / "_faiss").iterdir()):
            break
        time.sleep(0.002 if rows is None else 0.02)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {"killed_after_s": round(time.monotonic() - t0, 2), "where": where, "finished_first": finished,
            "rows_at_kill": rows_now(db)}


def kills(*, work: Path, source: Path, v1, v2, n: int, ref1: dict, ref2: dict, base: Path, rng: random.Random,
          durations: dict) -> list[dict]:
    """``n`` kills spread over the initial run, the incremental run and the FAISS write."""
    out = []
    for k in range(n):
        phase = ("initial", "incremental", "faiss-write")[k % 3]
        db = work / f"kill-{k}"
        shutil.rmtree(db, ignore_errors=True)
        manifest, ref = source, (ref1 if phase == "initial" else ref2)
        pq.write_table(v1 if phase == "initial" else v2, source)
        if phase != "initial":
            shutil.copytree(base, db)  # v1 indexed: the run replaces and deletes
        if phase == "initial":  # on a commit: once a random number of rows (a multiple of 16) has landed
            trial = {"phase": phase, **kill_trial(manifest=manifest, db=db, rows=16 * rng.randrange(
                1, len(ref1["images"][0]) // 16))}
        elif phase == "incremental":  # during its commits: a random moment after its first delete has landed
            trial = {"phase": phase, **kill_trial(manifest=manifest, db=db, below=len(ref1["images"][0]),
                                                  at=rng.uniform(0.0, 1.5))}
        else:
            trial = {"phase": phase, **kill_trial(manifest=manifest, db=db)}
        found = check(db) if (db / "c__images.lance").exists() else {"exit": None, "problems": []}
        trial["check_exit"], trial["check_problems"] = found["exit"], found["problems"]
        trial["rerun_exit"] = run("index", str(manifest), "--db", str(db), *FLAGS)
        trial.update(same(snapshot(db), ref))
        trial["rows_lost"] = len(ref["images"][0]) - len(snapshot(db)["images"][0])
        out.append(trial)
        print(f"kill {k:2d} {phase:<12} at {trial['killed_after_s']:6.2f} s ({trial['where']}): "
              f"{trial['rows_at_kill']} rows committed; check exit {trial['check_exit']} {trial['check_problems']}; "
              f"re-run exit {trial['rerun_exit']}; same ids {trial['same_ids']}, bit-identical {trial['bit_identical']}, "
              f"FAISS=LanceDB {trial['faiss_equals_lance']}, same top-10 {trial['same_top10']}", flush=True)
        shutil.rmtree(db, ignore_errors=True)
    return out


def two_writers(*, work: Path, source: Path, v1, ref1: dict) -> dict:
    pq.write_table(v1, source)
    db = work / "two"
    shutil.rmtree(db, ignore_errors=True)
    procs = [subprocess.Popen([*CLIPDEX, "index", str(source), "--db", str(db), *FLAGS], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    res = {"exit_codes": [r[0] for r in results],
           "refusal_names_holder": any("being written by pid" in r[1] for r in results), **same(snapshot(db), ref1)}
    print(f"two writers: exit codes {res['exit_codes']}, refusal names the holder {res['refusal_names_holder']}, "
          f"duplicates {res['duplicates']}, same ids {res['same_ids']}", flush=True)
    return res


def _randomize(path: Path, *, seed: int) -> None:
    """Random bytes over the middle half of a file (its header and footer intact)."""
    data = bytearray(path.read_bytes())
    a, b = len(data) // 4, 3 * len(data) // 4
    data[a:b] = np.random.default_rng(seed).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def damaged(*, work: Path, base: Path, ref1: dict) -> dict:
    """Random bytes in the middle of the images .faiss file, then of the largest images .lance data file."""
    out = {}
    db = work / "damaged"
    shutil.rmtree(db, ignore_errors=True)
    shutil.copytree(base, db)
    sidecar = json.loads((db / "_faiss" / "c__images.json").read_text())
    _randomize(db / "_faiss" / sidecar["files"]["index"], seed=0)
    out["faiss"] = {"check": check(db), **same(snapshot(db), ref1)}
    _randomize(max((db / "c__images.lance" / "data").iterdir(), key=lambda p: p.stat().st_size), seed=1)
    out["lance"] = {"check": check(db),
                    "filtered_search_exit": run("search", "a red circle", "--db", str(db), "--collection", "c",
                                                "--where", "width >= 1")}
    print(f"damaged FAISS: check exit {out['faiss']['check']['exit']} ({out['faiss']['check']['problems']}), then "
          f"search same top-10 {out['faiss']['same_top10']}; damaged LanceDB: check exit "
          f"{out['lance']['check']['exit']} ({out['lance']['check']['problems']}), filtered search "
          f"exit {out['lance']['filtered_search_exit']} (refused, no score shown)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("bench/results/faults-work"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/faults.json"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    source, v1, v2 = make_world(args.work, args.images, args.seed)
    base, ref = args.work / "ref1", args.work / "ref2"
    for d in (base, ref):
        shutil.rmtree(d, ignore_errors=True)
    pq.write_table(v1, source)
    t0 = time.monotonic()
    subprocess.run([*CLIPDEX, "index", str(source), "--db", str(base), *FLAGS], check=True, stdout=subprocess.DEVNULL)
    durations = {"initial": time.monotonic() - t0}
    ref1 = snapshot(base)
    shutil.copytree(base, ref)
    pq.write_table(v2, source)
    warm = args.work / "warm"
    shutil.rmtree(warm, ignore_errors=True)
    shutil.copytree(base, warm)
    t0 = time.monotonic()
    subprocess.run([*CLIPDEX, "index", str(source), "--db", str(warm), *FLAGS], check=True, stdout=subprocess.DEVNULL)
    durations["incremental"] = time.monotonic() - t0  # warm: what the timed kills spread over
    shutil.rmtree(warm)
    t0 = time.monotonic()
    subprocess.run([*CLIPDEX, "index", str(source), "--db", str(ref), *FLAGS], check=True, stdout=subprocess.DEVNULL)
    ref2 = snapshot(ref)
    print(f"clean runs: initial {durations['initial']:.1f} s ({len(ref1['images'][0])} images), incremental "
          f"{durations['incremental']:.1f} s ({len(ref2['images'][0])} images)", flush=True)
    record = {"images": args.images, "durations_s": durations,
              "kills": kills(work=args.work, source=source, v1=v1, v2=v2, n=args.kills, ref1=ref1, ref2=ref2, base=base,
                             rng=random.Random(args.seed), durations=durations),
              "two_writers": two_writers(work=args.work, source=source, v1=v1, ref1=ref1),
              "damaged": damaged(work=args.work, base=base, ref1=ref1)}
    k = record["kills"]
    print(f"\n{len(k)} kills: final rows equal the reference (ids, bit-identical vectors, FAISS=LanceDB, top-10) in "
          f"{sum(t['bit_identical'] and t['faiss_equals_lance'] and t['same_top10'] for t in k)}; rows lost "
          f"{sum(t['rows_lost'] for t in k)}; duplicates {sum(t['duplicates'] for t in k)}; check exit 0 after "
          f"{sum(t['check_exit'] == 0 for t in k)} of {sum(t['check_exit'] is not None for t in k)} kills", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
