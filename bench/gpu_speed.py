"""The GPU path at the hardware's pace (issue 16, section 3): one script for a GPU machine, every stage time-capped.

Installs nothing, downloads nothing: it makes its own data and uses ``ViT-B-32:random`` (open_clip's ViT-B-32 with
seeded random weights: the pretrained model's compute). Stages, in order (each under a time cap, the whole run under
``--budget`` seconds, the JSON rewritten after each stage so a killed run keeps what it measured):

  data        N photo-like 640x480 JPEGs (quality 90): ``--unique`` distinct files written with PIL in a process
              pool, hard-linked up to ``--images`` (the same bytes read, hashed and decoded per file).
  index       end to end ``run_index`` of that folder with ``--decode device`` (batches of JPEGs decoded on the GPU
              with nvJPEG, resized and normalised there; bf16 autocast; channels-last), images/s over the index
              loop; no patch-token grids (``--grids`` stores them), FAISS built after the loop (not in images/s).
  index_cpu   the same with ``--decode cpu`` (PIL in the decode workers), stopped after its cap: the comparison.
  model       image tower only: preprocessed random pixels already on the device, bf16 autocast, channels-last,
              batches of ``--model-batch``, after warm-up, timed between ``torch.cuda.synchronize()`` calls.
  text        captions/s: ``encode_texts`` end to end (open_clip's tokenizer on the CPU included), and the text
              tower alone on tokens already on the device.
  search      exact inner-product top-10 over ``--vectors`` random unit vectors (512-d), one query at a time: p50
              and p95 latency; faiss-gpu's ``GpuIndexFlatIP`` when installed, else a torch matmul + topk on the
              GPU (the report says which), each checked against numpy on a few queries.

    python bench/gpu_speed.py                               # the GPU machine: writes $OUT/gpu_speed.json
    .venv/bin/python bench/gpu_speed.py --quick --out /tmp/gpu_speed.json   # the same code on a CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import captions, pct  # noqa: E402

from clipdex.data_manifests.world.photos import photo_like  # noqa: E402

MODEL = "ViT-B-32:random"
FULL = dict(images=50_000, unique=4000, batch=1024, model_batch=1024, model_iters=40, texts=200_000,
            text_batch=4096, vectors=1_000_000, queries=500, caps=dict(data=60, index=120, index_cpu=45, model=60,
                                                                      text=60, search=60))
QUICK = dict(images=48, unique=16, batch=16, model_batch=8, model_iters=2, texts=256, text_batch=128,
             vectors=20_000, queries=30, caps=dict(data=60, index=120, index_cpu=60, model=60, text=60, search=30))


def _write_jpeg(args: tuple[int, str]) -> int:
    seed, path = args
    photo_like(seed).save(path, quality=90)
    return os.path.getsize(path)


def make_images(folder: Path, *, images: int, unique: int, workers: int, cap: float) -> dict:
    """``unique`` distinct JPEGs (stopping at ``cap`` seconds), then hard links up to ``images`` files."""
    t0 = time.perf_counter()
    src = folder / "unique"
    src.mkdir(parents=True)
    sizes = []
    with ProcessPoolExecutor(workers) as pool:
        for size in pool.map(_write_jpeg, [(i, str(src / f"u{i:05d}.jpg")) for i in range(unique)], chunksize=8):
            sizes.append(size)
            if time.perf_counter() - t0 > cap:
                pool.shutdown(cancel_futures=True)  # the files written so far are enough
                break
    made = sorted(src.iterdir())[:len(sizes)]
    out = folder / "images"
    out.mkdir()
    for i in range(images):
        os.link(made[i % len(made)], out / f"img{i:06d}.jpg")
    return {"images": images, "unique": len(made), "mean_bytes": float(np.mean(sizes)), "size": "640x480",
            "seconds": time.perf_counter() - t0}


def index_run(folder: Path, db: Path, *, decode: str, batch: int, workers: int, grids: bool, cap: float) -> dict:
    """``run_index`` of ``folder``; stopped after ``cap`` seconds of its loop (images/s from the progress then)."""
    from clipdex.indexer.runner import IndexSettings, IndexStopped, run_index

    marks: list[tuple[float, int]] = []

    def hook(done: int, total: int) -> None:
        marks.append((time.perf_counter(), done))
        if time.perf_counter() - marks[0][0] > cap:
            raise IndexStopped(f"stopped after {cap:.0f} s")

    settings = IndexSettings(source=str(folder), db=str(db), model=MODEL, decode=decode, batch_size=batch,
                             workers=workers, runtime="torch", grids=grids)
    try:
        s = run_index(settings, progress=False, on_progress=hook)
    except IndexStopped:
        (t0, d0), (t1, d1) = marks[0], marks[-1]
        return {"decode": decode, "stopped_after_s": cap, "images": d1 - d0,
                "images_per_s": (d1 - d0) / (t1 - t0) if t1 > t0 else None}
    return {"decode": s["engine"].get("decode"), "images": s["counts"]["indexed"], "failed": s["counts"]["failed"],
            "images_per_s": s["images_per_s"], "device_decode_fallbacks": s["engine"].get("device_decode_fallbacks"),
            "workers": s["workers"], "batch_size": batch, "grids": grids, "seconds": s["seconds"]}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def model_only(*, device: str, batch: int, iters: int, cap: float) -> dict:
    """The image tower on preprocessed pixels already on the device (what ``encode_image_tensors`` runs)."""
    import torch

    from clipdex.retrieval.models.encoder import load_encoder

    enc = load_encoder(MODEL, device=device, runtime="torch")
    pixels = torch.randn(batch, 3, enc.info.image_size, enc.info.image_size, device=enc.device)
    for _ in range(2):  # warm-up: kernels chosen, memory pools sized
        enc.encode_image_tensors(pixels)
    _sync(enc.device)
    t0, n = time.perf_counter(), 0
    while n < iters * batch and time.perf_counter() - t0 < cap:
        enc.encode_image_tensors(pixels)
        n += batch
    _sync(enc.device)
    secs = time.perf_counter() - t0
    return {"images": n, "batch": batch, "seconds": secs, "images_per_s": n / secs, "precision": "bf16 autocast"
            if enc.device.type == "cuda" else "fp32", "channels_last": enc.device.type == "cuda"}


def text_speed(*, device: str, n: int, batch: int, cap: float) -> dict:
    """Captions/s through ``encode_texts`` (tokenizer included) and through the text tower alone."""
    import torch

    from clipdex.retrieval.models.device import autocast
    from clipdex.retrieval.models.encoder import encode_text_trimmed, load_encoder

    enc = load_encoder(MODEL, device=device, runtime="torch")
    texts = captions(n=n, seed=0)
    enc.encode_texts(texts[:batch], batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    enc.encode_texts(texts, batch_size=batch)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = enc.tokenizer(texts)
    tokenize = time.perf_counter() - t0
    tokens = tokens.to(enc.device)
    with torch.no_grad(), autocast(enc.device, "auto"):
        encode_text_trimmed(enc.model, tokens[:batch])
        _sync(enc.device)
        t0, done = time.perf_counter(), 0
        while done < n and time.perf_counter() - t0 < cap:
            encode_text_trimmed(enc.model, tokens[done:done + batch])
            done += len(tokens[done:done + batch])
        _sync(enc.device)
    tower = time.perf_counter() - t0
    return {"captions": n, "batch": batch, "encode_texts_per_s": n / full, "tokenize_per_s": n / tokenize,
            "tower_only_per_s": done / tower, "mean_tokens": float((tokens.argmax(-1) + 1).float().mean())}


def search_speed(*, device: str, n: int, queries: int, cap: float, dim: int = 512, k: int = 10) -> dict:
    """Exact top-k over ``n`` random unit vectors, one query at a time; faiss-gpu if present, else torch."""
    import faiss
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, queries, replace=False)] + 0.05 * rng.standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    dev = torch.device(device)
    gpu_faiss = dev.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if gpu_faiss:
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, dim)
        index.add(x)
        engine = "faiss-gpu GpuIndexFlatIP (fp32)"
        search = lambda v: index.search(v, k)[1][0]  # noqa: E731
    elif dev.type == "cuda":
        xt = torch.from_numpy(x).to(dev)
        engine = "torch matmul + topk on the GPU (fp32; faiss-gpu not installed)"
        search = lambda v: torch.topk(xt @ torch.from_numpy(v[0]).to(dev), k).indices.cpu().numpy()  # noqa: E731
    else:
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        engine = "faiss-cpu IndexFlatIP (no GPU)"
        search = lambda v: index.search(v, k)[1][0]  # noqa: E731
    for i in range(3):  # right answers first: the exact top-k from numpy
        want = np.argsort(-(x @ q[i]))[:k]
        assert set(search(q[i:i + 1]).tolist()) == set(want.tolist()), "exact search disagrees with numpy"
    lat, t_start = [], time.perf_counter()
    for i in range(queries):
        t0 = time.perf_counter()
        search(q[i:i + 1])
        lat.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > cap:
            break
    return {"engine": engine, "vectors": n, "dim": dim, "k": k, "queries": len(lat), **pct(lat, (50, 95, 99))}


def environment(device: str) -> dict:
    """What ran it: the GPU, the library versions, the cores."""
    import faiss
    import torch
    import torchvision

    cuda = torch.device(device).type == "cuda"
    return {"gpu": torch.cuda.get_device_name(0) if cuda else None, "device": device, "cores": os.cpu_count(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "faiss": faiss.__version__,
            "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
            "cuda": torch.version.cuda, "command": " ".join([Path(sys.executable).name] + sys.argv)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU check of the code, not a measurement)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--out", type=Path, default=None, help="JSON report (default $OUT/gpu_speed.json, else "
                   "bench/results/gpu_speed.json)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (stages get what is left)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="decode workers")
    p.add_argument("--grids", action="store_true", help="store patch-token grids in the index run (default: off)")
    p.add_argument("--skip", default="", help="stages to skip, comma-separated (index,index_cpu,model,text,search)")
    for key in ("images", "unique", "batch", "model_batch", "model_iters", "texts", "text_batch", "vectors",
                "queries"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    args = p.parse_args(argv)
    import torch

    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: v for k, v in vars(args).items() if k in cfg and v is not None})
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = args.out or (Path(os.environ["OUT"]) / "gpu_speed.json" if os.environ.get("OUT")
                       else Path(__file__).resolve().parent / "results" / "gpu_speed.json")
    deadline = time.perf_counter() + args.budget
    report = {"environment": environment(device), "settings": {k: v for k, v in cfg.items() if k != "caps"},
              "caps_s": cfg["caps"], "stages": {}, "targets": {"index_images_per_s": 20_000, "model_images_per_s":
                                                               40_000, "text_captions_per_s": 100_000,
                                                               "search_1m_p50_ms": 1.0}}
    work = Path(args.work or tempfile.mkdtemp(prefix="clipdex-gpu-speed-"))
    skip = set(filter(None, args.skip.split(",")))

    def stage(name: str, fn, **kw) -> None:
        left = deadline - time.perf_counter()
        if name in skip or left < 5:
            report["stages"][name] = {"skipped": "asked" if name in skip else "out of time"}
        else:
            t0 = time.perf_counter()
            try:
                report["stages"][name] = fn(cap=min(cfg["caps"][name], left * 0.8), **kw)
            except Exception as e:  # noqa: BLE001 - a failed stage is reported, the others still run
                report["stages"][name] = {"error": f"{type(e).__name__}: {e}"}
            report["stages"][name]["stage_seconds"] = round(time.perf_counter() - t0, 2)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str))
        print(f"{name}: {json.dumps(report['stages'][name], default=str)}", flush=True)

    try:
        stage("data", make_images, folder=work, images=cfg["images"], unique=cfg["unique"], workers=args.workers)
        folder = work / "images"
        stage("index", index_run, folder=folder, db=work / "db-device", decode="device", batch=cfg["batch"],
              workers=args.workers, grids=args.grids)
        stage("index_cpu", index_run, folder=folder, db=work / "db-cpu", decode="cpu", batch=cfg["batch"],
              workers=args.workers, grids=args.grids)
        stage("model", model_only, device=device, batch=cfg["model_batch"], iters=cfg["model_iters"])
        stage("text", text_speed, device=device, n=cfg["texts"], batch=cfg["text_batch"])
        stage("search", search_speed, device=device, n=cfg["vectors"], queries=cfg["queries"])
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    _table(report)
    print(f"\nwrote {out}")
    return 0


def _table(report: dict) -> None:
    s, env, t = report["stages"], report["environment"], report["targets"]
    print(f"\n{env['gpu'] or 'no GPU'} ({env['device']}), torch {env['torch']}, torchvision {env['torchvision']}, "
          f"faiss {env['faiss']}")
    get = lambda st, key: s.get(st, {}).get(key)  # noqa: E731
    rows = [("index, --decode device (img/s)", get("index", "images_per_s"), t["index_images_per_s"]),
            ("index, --decode cpu (img/s)", get("index_cpu", "images_per_s"), None),
            ("image tower only (img/s)", get("model", "images_per_s"), t["model_images_per_s"]),
            ("encode_texts (captions/s)", get("text", "encode_texts_per_s"), t["text_captions_per_s"]),
            ("text tower only (captions/s)", get("text", "tower_only_per_s"), None),
            (f"exact search p50 (ms, {get('search', 'vectors')} vectors)", get("search", "p50_ms"),
             t["search_1m_p50_ms"])]
    print(f"{'measure':<44}{'value':>12}{'target':>10}")
    for name, value, target in rows:
        v = "-" if value is None else f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
        print(f"{name:<44}{v:>12}{'' if target is None else f'{target:,}':>10}")
    for name, st in s.items():
        if "error" in st:
            print(f"{name}: FAILED {st['error']}")


if __name__ == "__main__":
    raise SystemExit(main())
