"""PyTorch vs ONNX Runtime (fp32, and the image tower in int8) for a model's towers: fidelity (cosine to PyTorch
fp32, recall@1/5) and speed.

On a generated world of --images test images with one caption each: embeds every image and caption with the
PyTorch towers and with the ONNX Runtime export (``--runtime onnx``; exported into --cache first when it is
not there, and the export's seconds printed), then prints
- fidelity: cosine of each ONNX embedding to its PyTorch fp32 one, mean and minimum, images and captions
  (targets: >= 0.9999 for an fp32 export, >= 0.99 for int8), and recall@1/5 both ways with each runtime (within
  0.005); ``onnx-int8`` is ``--precision int8`` (the image tower int8, the text tower fp32);
- speed: images/s on pre-decoded batches of --batch, and one-caption text latency p50/p95 (a query), per
  runtime, with --threads torch/ORT threads.

    .venv/bin/python bench/runtime_speed.py                       # clipdex-world, 1,000 images (~2 min)
    .venv/bin/python bench/runtime_speed.py --model ViT-B-32:random --images 200
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from common import ensure_world, machine, pct, set_threads, write_report


def recall(img: np.ndarray, txt: np.ndarray) -> dict:
    """recall@1/5 text->image and image->text, caption i belonging to image i (ties count against)."""
    sim = txt @ img.T
    out = {}
    for name, s in (("t2i", sim), ("i2t", sim.T)):
        rank = (s > s.diagonal()[:, None]).sum(1)
        out[name] = {f"recall@{k}": float((rank < k).mean()) for k in (1, 5)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="clipdex-world")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch and ORT threads (0: every core)")
    ap.add_argument("--work", default="/tmp/clipdex-bench")
    ap.add_argument("--cache", default=None, help="export cache (default: $CLIPDEX_CACHE or ~/.cache/clipdex)")
    ap.add_argument("--out", default="bench/results/runtime_speed.json")
    args = ap.parse_args()
    if args.cache:
        os.environ["CLIPDEX_CACHE"] = args.cache
    set_threads(args.threads)

    import torch

    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.retrieval.models.encoder import load_encoder
    from clipdex.retrieval.models.images import open_rgb
    from clipdex.retrieval.models.onnx_runtime import export_folder

    folder = ensure_world(work=Path(args.work), images=args.images, seed=5, size=128)
    pairs = load_pairs(folder.parent / "manifest.parquet", split="test")
    texts = [caps[0] for caps in pairs.captions]
    ref = load_encoder(args.model, device="cpu")
    fresh = not (export_folder(ref.info) / "export.json").is_file()
    t0 = time.perf_counter()
    onnx = load_encoder(args.model, device="cpu", runtime="onnx")
    load_s = time.perf_counter() - t0
    int8 = load_encoder(args.model, device="cpu", runtime="onnx", precision="int8")
    print(f"{args.model}: ONNX {'exported and ' if fresh else ''}loaded in {load_s:.1f} s ({export_folder(ref.info)})")
    pixels = torch.stack([ref.preprocess(open_rgb(p)) for p in pairs.paths])
    report = {"model": args.model, "images": len(texts), "batch": args.batch, "machine": machine(),
              "onnx_load_seconds": load_s, "exported_now": fresh, "runtimes": {}}
    emb = {}
    for name, enc in (("torch", ref), ("onnx", onnx), ("onnx-int8", int8)):
        enc.encode_image_tensors(pixels[: args.batch])  # warm-up
        t0 = time.perf_counter()
        img = torch.cat([enc.encode_image_tensors(pixels[i:i + args.batch]) for i in range(0, len(pixels), args.batch)])
        img_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        txt = enc.encode_texts(texts)
        txt_s = time.perf_counter() - t0
        lat = []
        for q in texts[:200]:
            t1 = time.perf_counter()
            enc.encode_texts([q])
            lat.append(time.perf_counter() - t1)
        emb[name] = (img.numpy(), txt)
        report["runtimes"][name] = {"images_per_s": len(pixels) / img_s, "captions_per_s": len(texts) / txt_s,
                                    "query": pct(lat), "recall": recall(img.numpy(), txt)}
    (ti, tt) = emb["torch"]
    report["fidelity"] = {}
    for name in ("onnx", "onnx-int8"):
        oi, ot = emb[name]
        ci, ct = (ti * oi).sum(-1), (tt * ot).sum(-1)
        f = report["fidelity"][name] = {"image_cos_mean": float(ci.mean()), "image_cos_min": float(ci.min()),
                                        "caption_cos_mean": float(ct.mean()), "caption_cos_min": float(ct.min())}
        print(f"\nfidelity, {name} vs PyTorch fp32 ({len(texts)} images, {len(texts)} captions): images cos mean "
              f"{f['image_cos_mean']:.7f} min {f['image_cos_min']:.7f}; captions mean {f['caption_cos_mean']:.7f} "
              f"min {f['caption_cos_min']:.7f}")
    print(f"\n{'runtime':<10}{'img/s':>9}{'cap/s':>9}{'query p50':>11}{'p95':>8}  recall@1/5 t2i, i2t")
    for name, r in report["runtimes"].items():
        rc = r["recall"]
        print(f"{name:<10}{r['images_per_s']:>9.1f}{r['captions_per_s']:>9.1f}{r['query']['p50_ms']:>9.2f}ms"
              f"{r['query']['p95_ms']:>6.2f}ms  {rc['t2i']['recall@1']:.3f}/{rc['t2i']['recall@5']:.3f}, "
              f"{rc['i2t']['recall@1']:.3f}/{rc['i2t']['recall@5']:.3f}")
    t = report["runtimes"]["torch"]
    for name in ("onnx", "onnx-int8"):
        o = report["runtimes"][name]
        print(f"{name} / torch: images {o['images_per_s'] / t['images_per_s']:.2f}x, one-caption query "
              f"{t['query']['p50_ms'] / o['query']['p50_ms']:.2f}x faster")
    write_report(report, Path(args.out))


if __name__ == "__main__":
    main()
