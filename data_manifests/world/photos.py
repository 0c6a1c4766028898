"""Photo-like pictures for benchmarks and tests: no photo collection can be downloaded here, and the world's flat
scenes decode unlike camera files. Smooth colour fields, shapes with edges, blur and a little grain, from a seed."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo_like(seed: int, *, width: int = 640, height: int = 480) -> Image.Image:
    """A seeded RGB picture of ``width`` x ``height`` with what photos have and noise lacks (any size from 1 px)."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(x * r.uniform(2, 9) + y * r.uniform(-4, 4) + r.uniform(0, 6)) * 0.5 + 0.5
                     for _ in range(3)], -1)
    base = base * r.uniform(0.4, 1.0, 3) + r.normal(0, 0.04, (height, width, 3))
    im = Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = int(r.integers(0, width)), int(r.integers(0, height))
        draw.ellipse([x0, y0, x0 + int(r.integers(5, width // 2 + 6)), y0 + int(r.integers(5, height // 2 + 6))],
                     fill=tuple(int(v) for v in r.integers(0, 255, 3)))
    return im.filter(ImageFilter.GaussianBlur(1))
