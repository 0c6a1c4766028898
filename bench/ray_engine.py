"""``clipdex index --engine ray`` against the local engine on this machine, and the Ray engine with 1, 2, 4 embed
actors: images/s, what Ray's start-up costs, and where the time goes.

Each run indexes the same generated world (N images, one caption each, from its manifest) into a fresh database,
FAISS indexes included, with ``run_index`` in this process; the Ray runs start their own local cluster of this
machine's cores (as ``clipdex index --engine ray`` without --address does). Reported per run:
  loop images/s   indexed / seconds['index_loop'] (the pipeline, from the plan to the last commit)
  total images/s  indexed / seconds['total'] (read, model load, Ray start-up, plan, loop, compaction, FAISS)
  worker seconds  decode, embed and write time summed over the Ray workers, and the driver's commit time
The scaling model at the end extrapolates from the measured per-image costs: a node adds its cores' embed rate;
the driver's commits are serial (seconds per committed image, measured), which bounds any cluster.

    .venv/bin/python bench/ray_engine.py                        # 2000 images, actors 1,2,4
    .venv/bin/python bench/ray_engine.py --images 400 --actors 1,2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from common import ensure_world, write_report


def run(*, manifest: Path, db: Path, engine: str, actors: int = 1, cpus_per_actor: float = 1.0,
        batch_size: int, gpus_per_actor: float = 0.0) -> dict:
    """One index run into a fresh ``db``; returns its summary."""
    from clipdex.indexer.ray_engine import RayConfig
    from clipdex.indexer.runner import IndexSettings, run_index

    shutil.rmtree(db, ignore_errors=True)
    settings = IndexSettings(source=str(manifest), split="test", db=str(db), collection="bench", batch_size=batch_size,
                             engine=engine, ray=RayConfig(embed_actors=actors, cpus_per_worker=cpus_per_actor,
                                                          num_gpus_per_worker=gpus_per_actor))
    return run_index(settings, progress=False)


def ray_start_seconds() -> float:
    """Seconds ``ray.init`` takes to start a local cluster here (and shut it down: not counted)."""
    import ray

    t0 = time.perf_counter()
    ray.init(include_dashboard=False, logging_level="WARNING")
    out = time.perf_counter() - t0
    ray.shutdown()
    return out


def row(name: str, s: dict) -> dict:
    """The table's numbers for one run's summary."""
    n, sec = s["counts"]["indexed"], s["seconds"]
    eng = s["engine"]
    out = {"run": name, "indexed": n, "loop_images_per_s": n / sec["index_loop"], "total_images_per_s": n / sec["total"],
           "seconds": sec}
    if eng["name"] == "ray":
        out["worker_seconds"] = eng["worker_seconds"]
        out["commits"] = eng["commits"]
        out["commit_seconds"] = sec["write"]
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and writes the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="images in the world (default 2000)")
    ap.add_argument("--actors", default="1,2,4", help="embed actor counts for the Ray runs (default 1,2,4)")
    ap.add_argument("--model", default="clipdex-world", help="model spec (default clipdex-world)")
    ap.add_argument("--batch-size", type=int, default=256, help="encoder batch, every run (default 256)")
    ap.add_argument("--gpus-per-actor", type=float, default=0.0,
                    help="GPUs per embed actor (a GPU machine: 0.25 puts four actors on one GPU; default 0)")
    ap.add_argument("--work", default="/tmp/clipdex-bench", help="world and databases go here (default %(default)s)")
    ap.add_argument("--size", type=int, default=128, help="world image side in pixels (default 128)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ray_engine.json"),
                    help="JSON report path (default bench/results/ray_engine.json)")
    args = ap.parse_args(argv)
    if args.model != "clipdex-world":
        raise SystemExit("--model: this bench indexes the world with clipdex-world only")

    work = Path(args.work)
    folder = ensure_world(work=work, images=args.images, seed=0, size=args.size)
    manifest = folder.parent / "manifest.parquet"
    cores = os.cpu_count() or 1
    print(f"{args.images} images of {args.size} px (one caption each), {cores} cores, batch {args.batch_size}",
          flush=True)
    start = ray_start_seconds()
    print(f"ray.init of a local cluster: {start:.1f} s", flush=True)
    rows = [row("local engine", run(manifest=manifest, db=work / "db-local", engine="local",
                                    batch_size=args.batch_size))]
    print(f"  {rows[-1]['run']}: {rows[-1]['loop_images_per_s']:.0f} img/s", flush=True)
    for n in [int(a) for a in args.actors.split(",") if a.strip()]:
        # the actors share what one CPU-bound actor would have (cores - 1: one core is left for decoding and writing)
        cpus = 1.0 if n == 1 or args.gpus_per_actor else max(0.1, min(1.0, (cores - 1) / n))
        name = f"ray, {n} embed actor{'s' if n > 1 else ''} ({cpus:g} CPU each)"
        rows.append(row(name, run(manifest=manifest, db=work / f"db-ray-{n}", engine="ray", actors=n,
                                  cpus_per_actor=cpus, batch_size=args.batch_size, gpus_per_actor=args.gpus_per_actor)))
        print(f"  {name}: {rows[-1]['loop_images_per_s']:.0f} img/s", flush=True)

    print(f"\n{'run':<38} {'loop img/s':>10} {'total img/s':>11} {'loop s':>7} {'total s':>8}  worker seconds")
    for r in rows:
        ws = r.get("worker_seconds")
        detail = (f"decode {ws['decode']:.1f}, embed {ws['embed']:.1f}, write {ws['write']:.1f}; driver commits "
                  f"{r['commit_seconds']:.2f} s in {r['commits']}") if ws else (
            f"decode cpu {r['seconds']['decode_worker_cpu']:.1f}, embed {r['seconds']['embed']:.1f}, write "
            f"{r['seconds']['write']:.2f}")
        print(f"{r['run']:<38} {r['loop_images_per_s']:>10.0f} {r['total_images_per_s']:>11.0f} "
              f"{r['seconds']['index_loop']:>7.1f} {r['seconds']['total']:>8.1f}  {detail}")
    local, ray1 = rows[0], rows[1] if len(rows) > 1 else None
    model = {}
    if ray1:
        n = ray1["indexed"]
        embed_per_image = ray1["worker_seconds"]["embed"] / n  # one actor-core's seconds per image
        decode_per_image = ray1["worker_seconds"]["decode"] / n
        commit_per_image = ray1["commit_seconds"] / n
        model = {"embed_core_seconds_per_image": embed_per_image, "decode_core_seconds_per_image": decode_per_image,
                 "driver_commit_seconds_per_image": commit_per_image,
                 "per_core_images_per_s": 1 / (embed_per_image + decode_per_image),
                 "driver_commit_bound_images_per_s": 1 / commit_per_image if commit_per_image else None,
                 "ray_vs_local_loop": ray1["loop_images_per_s"] / local["loop_images_per_s"]}
        print(f"\nRay, 1 actor vs local (loop): {model['ray_vs_local_loop']:.2f}x; Ray start-up {start:.1f} s per run")
        print(f"per image: embed {embed_per_image * 1e3:.2f} ms, decode {decode_per_image * 1e3:.2f} ms of a core; "
              f"driver commit {commit_per_image * 1e3:.3f} ms")
        print(f"scaling model: each core adds about {model['per_core_images_per_s']:.0f} img/s (decode + embed on "
              f"CPU); the serial driver commits cap a cluster at about "
              f"{model['driver_commit_bound_images_per_s'] or float('inf'):.0f} img/s")
    write_report({"images": args.images, "size": args.size, "cores": cores, "batch_size": args.batch_size,
                  "python": sys.version.split()[0], "ray_init_seconds": start, "runs": rows, "model": model},
                 Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
