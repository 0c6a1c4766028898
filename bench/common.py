"""Helpers the benchmark scripts share: generated worlds, world-style captions, percentiles, threads, the machine.

The scripts run as ``.venv/bin/python bench/NAME.py``, so this folder is on ``sys.path`` and they import it as
``common``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def ensure_world(*, work: Path, images: int, seed: int, size: int) -> Path:
    """A world folder of ``images`` test images under ``work`` (generated once, then reused); returns images/."""
    out = work / f"world-n{images}-s{seed}-px{size}"
    meta = out / "world.json"
    if meta.is_file():
        cfg = json.loads(meta.read_text()).get("config", {})
        if cfg.get("test") == images and cfg.get("image_size") == size and cfg.get("seed") == seed:
            return out / "images"
    clipdex = Path(sys.executable).with_name("clipdex")
    cmd = [str(clipdex), "world", "generate", "--out", str(out), "--seed", str(seed), "--train", "0", "--test",
           str(images), "--corpus", "0", "--landmarks", "0", "--views", "0", "--captions", "1", "--size", str(size),
           "--no-progress", "--overwrite"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"generated {images} images in {out} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return out / "images"


def captions(*, n: int, seed: int) -> list[str]:
    """``n`` world-style captions, e.g. 'a red circle left of a blue star'."""
    from clipdex.data_manifests.world.vocab import (
        COLOURS,
        RELATION_WORDS,
        SHAPES,
        SPATIAL_RELATIONS,
    )

    rng = np.random.default_rng(seed)
    col, rel = list(COLOURS), [w for r in SPATIAL_RELATIONS for w in RELATION_WORDS[r]]
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    return [f"a {pick(['', 'small ', 'large '])}{pick(col)} {pick(SHAPES)} {pick(rel)} a {pick(col)} {pick(SHAPES)}"
            for _ in range(n)]


def pct(xs: list[float], qs: tuple[int, ...] = (50, 95)) -> dict:
    """Percentiles ``qs`` of seconds, in milliseconds: ``{"p50_ms": ..., "p95_ms": ...}``."""
    return {f"p{q}_ms": float(np.percentile(xs, q) * 1e3) for q in qs}


def set_threads(threads: int | None) -> None:
    """torch and FAISS threads in this process (None or 0: leave theirs, every core)."""
    if threads:
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def machine() -> dict:
    """Cores, platform, torch and FAISS versions and the threads each uses now (for a JSON report)."""
    import faiss
    import torch

    return {"cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "faiss": faiss.__version__, "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads()}


def _json_value(o):
    """numpy scalars as numbers, anything else (paths, dtypes) as its string."""
    return o.item() if hasattr(o, "item") else str(o)


def write_report(report: dict, out: Path) -> None:
    """Write a bench's JSON report to ``out`` (its folder made if needed) and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=_json_value))
    print(f"\nwrote {out}")
