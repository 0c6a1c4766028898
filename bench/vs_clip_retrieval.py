"""clipdex against ``clip-retrieval inference`` on the same JPEG files and the same ViT-B-32 weights, side by side.

Makes ``--images`` photo-like 640x480 JPEGs (blurred colour noise with shapes, about 80 KB each) and one ViT-B-32
checkpoint of random weights (the same cost as pretrained ones; no model hub here), then times, one after another
on the same machine, each ``--repeats`` times:

- ``clip-retrieval inference`` (2.45.0, in its own virtual environment ``--peer-venv``, made when missing with
  ``setuptools<82`` so that it imports; ``--clip_model open_clip:ViT-B-32/<checkpoint>``, images only, its
  defaults otherwise except ``--num_prepro_workers`` = cores and ``--use_jit False``);
- ``clipdex index`` of the folder into a fresh database with ``--model ViT-B-32:<checkpoint>``, with
  ``--runtime torch``, the default ``--runtime auto``, and ``--precision int8``. The ONNX exports (made once per
  weights, like a download) are made first on 8 of the images and their time reported apart.

Reported: each command's wall seconds (process start to exit, start-up included, as a user waits), images/s from
them, and each clipdex run's ratio to the peer's median; clipdex's own loop images/s too.

    .venv/bin/python bench/vs_clip_retrieval.py                   # 1,000 images, 2 repeats (about 10 minutes)
    .venv/bin/python bench/vs_clip_retrieval.py --images 200 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import write_report

CLIPDEX = str(Path(sys.executable).with_name("clipdex"))
PEER = "clip-retrieval==2.45.0"


def photo_jpegs(folder: Path, n: int, *, seed: int = 0) -> None:
    """``n`` 640x480 JPEGs that decode like photos (smooth colour fields, shapes, quality 90)."""
    from PIL import Image, ImageDraw, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == n:
        return
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
        im = Image.fromarray(base).resize((640, 480), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = int(rng.integers(0, 600)), int(rng.integers(0, 440))
            draw.ellipse([x, y, x + int(rng.integers(20, 200)), y + int(rng.integers(20, 200))],
                         fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        im.save(folder / f"IMG_{i:05d}.jpg", quality=90)


def checkpoint(path: Path) -> None:
    """ViT-B-32 with clipdex's reproducible random weights, as a plain state dict both tools load."""
    if path.is_file():
        return
    import torch

    from clipdex.retrieval.models.encoder import RANDOM_INIT_SEED, build_model

    torch.save(build_model("ViT-B-32:random", seed=RANDOM_INIT_SEED).model.state_dict(), path)


def peer_venv(folder: Path) -> Path:
    """The peer's ``clip-retrieval`` executable, installing it in its own venv first when needed."""
    exe = folder / "bin" / "clip-retrieval"
    if not exe.is_file():
        print(f"installing {PEER} into {folder} ...")
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(folder / "bin" / "pip"), "install", "-q", PEER, "setuptools<82"], check=True)
    return exe


def wall(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default="/tmp/clipdex-vs-peer")
    ap.add_argument("--peer-venv", default="/tmp/clip-retrieval-venv")
    ap.add_argument("--out", default="bench/results/vs_clip_retrieval.json")
    args = ap.parse_args()
    work = Path(args.work)
    images = work / f"jpegs-{args.images}"
    photo_jpegs(images, args.images)
    ckpt = work / "vit-b-32-random.pt"
    checkpoint(ckpt)
    peer = peer_venv(Path(args.peer_venv))
    cores = os.cpu_count()
    # the exports are made once per weights (like a download): made here, on a few images, and timed apart
    few = work / "few"
    few.mkdir(exist_ok=True)
    for f in sorted(images.glob("*.jpg"))[:8]:
        shutil.copy(f, few / f.name)
    exports = {}
    for flags in ([], ["--precision", "int8"]):
        shutil.rmtree(work / "db-few", ignore_errors=True)
        _, stdout = wall([CLIPDEX, "index", str(few), "--db", str(work / "db-few"), "--collection", "w", "--model",
                          f"ViT-B-32:{ckpt.resolve()}", "--device", "cpu", "--json", *flags])
        exports[" ".join(flags) or "auto"] = json.loads(stdout.strip().splitlines()[-1])["seconds"]["load_model"]
    print(f"model load with the exports made or found (once per weights): {exports}")
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        out = work / "peer-out"
        shutil.rmtree(out, ignore_errors=True)
        secs, _ = wall([str(peer), "inference", "--input_dataset", str(images), "--output_folder", str(out),
                        "--clip_model", f"open_clip:ViT-B-32/{ckpt.resolve()}", "--enable_text", "False",
                        "--num_prepro_workers", str(cores), "--use_jit", "False"])
        runs.setdefault("clip-retrieval", []).append({"wall_s": secs})
        print(f"clip-retrieval inference: {secs:.1f} s")
        for name, flags in (("clipdex torch", ["--runtime", "torch"]), ("clipdex auto", []),
                            ("clipdex int8", ["--precision", "int8"])):
            db = work / "db"
            shutil.rmtree(db, ignore_errors=True)
            secs, stdout = wall([CLIPDEX, "index", str(images), "--db", str(db), "--collection", "b", "--model",
                                 f"ViT-B-32:{ckpt.resolve()}", "--device", "cpu", "--json", *flags])
            summary = json.loads(stdout.strip().splitlines()[-1])
            runs.setdefault(name, []).append({"wall_s": secs, "loop_images_per_s": summary["images_per_s"],
                                              "indexed": summary["counts"]["indexed"], "runtime": summary["runtime"],
                                              "load_model_s": summary["seconds"].get("load_model")})
            print(f"{name}: {secs:.1f} s ({summary['runtime']}, loop {summary['images_per_s']:.1f} images/s)")
    peer_s = float(np.median([r["wall_s"] for r in runs["clip-retrieval"]]))
    report = {"images": args.images, "repeats": args.repeats, "cores": cores, "peer": PEER, "runs": runs,
              "first_load_with_export_s": exports, "summary": {}}
    print(f"\n{args.images} JPEGs 640x480, ViT-B-32, {cores} cores, wall seconds (each run), images/s at the median:")
    print(f"{'tool':<16}{'wall s':>18}{'images/s':>10}{'x peer':>8}")
    for name, rs in runs.items():
        med = float(np.median([r["wall_s"] for r in rs]))
        report["summary"][name] = {"median_wall_s": med, "images_per_s": args.images / med, "x_peer": peer_s / med}
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in rs)
        print(f"{name:<16}{walls:>18}{args.images / med:>10.1f}{peer_s / med:>8.2f}")
    write_report(report, Path(args.out))


if __name__ == "__main__":
    main()
