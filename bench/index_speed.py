"""Indexing throughput: encoder-only images/s against end-to-end ``run_index`` images/s, per model.

For each model: generate (or reuse) a world folder of N images, then
  (a) encoder-only: decode every image into tensors first (in this process), then time
      ``encode_image_tensors`` over those batches after a warm-up call;
  (b) end-to-end: ``run_index`` from the folder into a fresh database (FAISS index built too);
      images/s = indexed / seconds['index_loop'], with the per-stage seconds.
ratio = end-to-end / encoder-only (target >= 0.9: the pipeline keeps the encoder fed).
The folder has no captions, so seconds['embed'] is image embedding only.

    .venv/bin/python bench/index_speed.py                       # clipdex-world (2000) and ViT-B-32:random (400)
    .venv/bin/python bench/index_speed.py --images clipdex-world=200,ViT-B-32:random=40
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from common import ensure_world, write_report

DEFAULT_MODELS = "clipdex-world,ViT-B-32:random"
DEFAULT_IMAGES = "clipdex-world=2000,ViT-B-32:random=400,2000"
STAGES = ("read", "load_model", "plan", "decode_wait", "decode_worker_cpu", "embed", "write", "compact", "faiss",
          "index_loop", "total")


def parse_counts(text: str, *, models: list[str]) -> dict[str, int]:
    """``"2000"`` or ``"clipdex-world=2000,ViT-B-32:random=400,1000"`` -> images per model.

    A bare number is the count for every model not named; a model with no count and no bare number is an error.
    """
    default, named = None, {}
    for tok in filter(None, (t.strip() for t in text.split(","))):
        if "=" in tok:
            spec, n = tok.rsplit("=", 1)
            named[spec.strip()] = int(n)
        else:
            default = int(tok)
    out = {}
    for m in models:
        n = named.get(m, default)
        if n is None or n < 1:
            raise SystemExit(f"--images: no image count for model {m!r} (give {m}=N or a bare N)")
        out[m] = n
    return out


def encoder_only(*, model: str, folder: Path, batch_size: int, warmup: int) -> dict:
    """Pre-decode every image of ``folder``, then time ``encode_image_tensors`` over the batches."""
    import torch

    from clipdex.indexer.decode import DecodePool
    from clipdex.indexer.reader import read_folder
    from clipdex.retrieval.models.encoder import load_encoder

    enc = load_encoder(model)
    items = read_folder(folder).items
    t0 = time.perf_counter()
    batches = [b["pixels"] for b in DecodePool(0).batches(items, enc.preprocess, batch_size=batch_size,
                                                          draft_size=enc.info.image_size) if b["pixels"] is not None]
    decode_s = time.perf_counter() - t0
    n = sum(len(b) for b in batches)
    enc.encode_image_tensors(batches[0][:warmup]).cpu().numpy()  # warm-up (a slice: a full ViT batch costs ~30 s)
    t0 = time.perf_counter()
    for b in batches:
        enc.encode_image_tensors(b).cpu().numpy()
    embed_s = time.perf_counter() - t0
    del batches
    return {"images": n, "decode_seconds_one_process": round(decode_s, 3), "embed_seconds": round(embed_s, 3),
            "images_per_s": n / embed_s, "device": str(enc.device), "torch_threads": torch.get_num_threads(),
            "embed_dim": enc.info.embed_dim, "image_size": enc.info.image_size}


def end_to_end(*, model: str, folder: Path, db: Path, batch_size: int, workers: int | None) -> dict:
    """``run_index`` from ``folder`` into a fresh database at ``db``; returns the summary without failures."""
    from clipdex.indexer.runner import IndexSettings, run_index
    from clipdex.retrieval.store.faiss_index import IndexConfig

    shutil.rmtree(db, ignore_errors=True)
    settings = IndexSettings(source=str(folder), db=str(db), collection="bench", model=model, batch_size=batch_size,
                             workers=workers, build_index=True, index=IndexConfig())
    summary = run_index(settings, progress=False)
    loop = summary["seconds"]["index_loop"]
    summary["end_to_end_images_per_s"] = summary["counts"]["indexed"] / loop if loop > 0 else None
    summary["embed_images_per_s"] = (summary["counts"]["indexed"] / summary["seconds"]["embed"]
                                     if summary["seconds"]["embed"] > 0 else None)
    summary["failures"] = len(summary["failures"])  # the count (the list names files)
    return summary


def _fmt(x, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def print_tables(results: list[dict], *, torch_threads: int, workers: int) -> None:
    """The throughput table and the stage breakdown, to stdout."""
    print(f"\ntorch threads: {torch_threads}   decode workers: {workers}   cores: {os.cpu_count()}")
    head = f"{'model':<18} {'images':>6} {'enc-only img/s':>14} {'end-to-end img/s':>16} {'ratio':>6} " \
           f"{'embed img/s in run':>18}"
    print(head + "\n" + "-" * len(head))
    for r in results:
        e, x = r["encoder_only"], r["end_to_end"]
        print(f"{r['model']:<18} {r['images']:>6} {_fmt(e['images_per_s']):>14} "
              f"{_fmt(x['end_to_end_images_per_s']):>16} {_fmt(r['ratio'], 3):>6} {_fmt(x['embed_images_per_s']):>18}")
    print("\nstage seconds of the end-to-end run (decode_worker_cpu is summed over workers; index_loop = "
          "decode+embed+write, overlapped)")
    head = f"{'model':<18} " + " ".join(f"{s:>{max(7, len(s))}}" for s in STAGES)
    print(head + "\n" + "-" * len(head))
    for r in results:
        sec = r["end_to_end"]["seconds"]
        print(f"{r['model']:<18} " + " ".join(f"{_fmt(sec.get(s), 2):>{max(7, len(s))}}" for s in STAGES))
    print("\ntarget: ratio >= 0.9 (end-to-end keeps the encoder fed)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the tables and writes the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="The JSON report holds the tables' numbers and the run_index summaries.")
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated model specs (default {DEFAULT_MODELS})")
    ap.add_argument("--images", default=DEFAULT_IMAGES,
                    help="images per model: N for all, or SPEC=N,... plus an optional bare N for the rest "
                         f"(default {DEFAULT_IMAGES})")
    ap.add_argument("--work", default="/tmp/clipdex-bench", help="worlds and databases go here (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    ap.add_argument("--size", type=int, default=128, help="world image side in pixels (default 128)")
    ap.add_argument("--batch-size", type=int, default=256, help="encoder batch, both runs (default 256)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers of the end-to-end run "
                    "(default: the indexer's default, cores - 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in this process (default: torch's, "
                    "all cores)")
    ap.add_argument("--warmup", type=int, default=32, help="images in the encoder-only warm-up call (default 32)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "index_speed.json"),
                    help="JSON report path (default bench/results/index_speed.json)")
    args = ap.parse_args(argv)

    import torch

    from clipdex.retrieval.models.images import default_workers

    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    counts = parse_counts(args.images, models=models)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    workers = default_workers() if args.workers is None else args.workers
    results = []
    for model in models:
        folder = ensure_world(work=work, images=counts[model], seed=args.seed, size=args.size)
        print(f"[{model}] encoder-only over {counts[model]} pre-decoded images ...", flush=True)
        enc = encoder_only(model=model, folder=folder, batch_size=args.batch_size, warmup=args.warmup)
        print(f"[{model}] end-to-end run_index ...", flush=True)
        slug = "".join(c if c.isalnum() else "_" for c in model)
        e2e = end_to_end(model=model, folder=folder, db=work / f"db-{slug}", batch_size=args.batch_size,
                         workers=workers)
        ratio = e2e["end_to_end_images_per_s"] / enc["images_per_s"] if e2e["end_to_end_images_per_s"] else None
        results.append({"model": model, "images": counts[model], "encoder_only": enc, "end_to_end": e2e,
                        "ratio": ratio, "target_ratio": 0.9})
    print_tables(results, torch_threads=torch.get_num_threads(), workers=workers)
    report = {"benchmark": "index_speed", "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:],
              "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
              "decode_workers": workers, "batch_size": args.batch_size, "results": results}
    write_report(report, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
