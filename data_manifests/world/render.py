"""Draw a scene as a photo-like image: supersampled shapes on a patterned background, then camera effects.

Drawing happens at ``SUPERSAMPLE`` times the output size (anti-aliasing for free when downscaling), with
PIL pastes through shape masks (numpy only builds the pattern and stripe masks). After the downscale
(which also applies an optional crop, for landmark query views) each image gets a gaussian blur (radius
0-0.6 px at 128 px) and gaussian pixel noise (sigma 0-6). All randomness comes from the caller's
generator, so an image is a pure function of (scene, generator state).
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from clipdex.data_manifests.world import vocab
from clipdex.data_manifests.world.scene import Scene, SceneObject

SUPERSAMPLE = 2
OUTLINE_WIDTH = 0.022  # border of large hollow objects, fraction of image width (small: 85% of it)
STRIPES_ACROSS = 3  # coloured stripes across an object's diameter
STRIPE_GAP_RGB = (238, 238, 232)  # light gaps between an object's stripes
BACKGROUND_CONTRAST = 12.0  # +- luminance of background patterns (subtle)
MAX_NOISE_SIGMA = 6.0
MAX_BLUR_AT_128 = 0.6


def _jitter_rgb(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    j = rng.integers(-vocab.COLOUR_JITTER, vocab.COLOUR_JITTER + 1, size=3)
    r, g, b = (min(255, max(0, int(v) + int(d))) for v, d in zip(rgb, j, strict=True))
    return (r, g, b)


@lru_cache(maxsize=8)
def _unit_coords(size: int) -> np.ndarray:
    """Pixel coordinates as fractions of the side, (size,) float32 in [0, 1); cached, read-only."""
    t = np.arange(size, dtype=np.float32) / size
    t.flags.writeable = False
    return t


def render_background(kind: str, colour: str, *, size: int, rng: np.random.Generator) -> Image.Image:
    """A ``size`` x ``size`` RGB background: a muted colour with a subtle ``kind`` pattern."""
    base = _jitter_rgb(vocab.BACKGROUND_COLOURS[colour], rng)
    if kind == "plain":
        return Image.new("RGB", (size, size), base)
    c = BACKGROUND_CONTRAST
    t = _unit_coords(size)
    xs, ys = t[None, :], t[:, None]  # (1, S) and (S, 1): patterns are built by broadcasting
    if kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        lum = (2.4 * c) * ((xs - 0.5) * math.cos(a) + (ys - 0.5) * math.sin(a))
    elif kind == "checkered":
        n = int(rng.integers(6, 10))
        cells = (t * n).astype(np.int32) % 2
        lum = np.where(cells[None, :] ^ cells[:, None], -c, c)
    elif kind == "noisy":
        n = max(8, size // 8)
        small = rng.normal(0.0, c, size=(n, n)).astype(np.float32)
        lum = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR))
    elif kind == "striped":
        a = math.radians(float(rng.choice([0.0, 45.0, 90.0, 135.0])))
        period = 1.0 / float(rng.integers(7, 11))
        phase = (xs * (math.cos(a) / period)) + (ys * (math.sin(a) / period))
        lum = np.where(phase % 1.0 < 0.5, c, -c)
    else:
        raise ValueError(f"unknown background kind {kind!r}; expected one of {vocab.BACKGROUND_KINDS}")
    # lum (S, S) around 128 as one grey band, then add the colour with offset -128 (all in PIL, in C)
    grey = Image.fromarray(np.clip(np.broadcast_to(lum, (size, size)) + 128.5, 0, 255).astype(np.uint8))
    rgb = Image.merge("RGB", (grey, grey, grey))
    return ImageChops.add(rgb, Image.new("RGB", (size, size), base), scale=1.0, offset=-128)


def shape_points(shape: str, r: float, rotation_deg: float) -> list[tuple[float, float]]:
    """Polygon vertices of ``shape`` with circumradius ``r`` around (0, 0), y down (circle: 64-gon)."""
    if shape == "circle":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 64, endpoint=False)]
    elif shape == "square":
        pts = [(-0.72, -0.72), (0.72, -0.72), (0.72, 0.72), (-0.72, 0.72)]
    elif shape == "triangle":
        # an inscribed triangle looks small next to a circle: 12% larger, still clear of neighbours
        pts = [(1.12 * math.cos(math.radians(a)), 1.12 * math.sin(math.radians(a)) + 0.06) for a in (-90, 30, 150)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.42
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a) + 0.05))
    elif shape == "cross":
        w = 0.32
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
               (-1, -w), (-w, -w)]
        pts = [(x * 0.9, y * 0.9) for x, y in pts]
    elif shape == "diamond":
        pts = [(0, -1), (0.68, 0), (0, 1), (-0.68, 0)]
    elif shape == "hexagon":
        pts = [(math.cos(math.radians(60 * k)), math.sin(math.radians(60 * k))) for k in range(6)]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        hx = 16 * np.sin(ts) ** 3
        hy = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        pts = [(x / 17.0, (y + 2.5) / 17.0) for x, y in zip(hx, hy, strict=True)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {vocab.SHAPES}")
    a = math.radians(rotation_deg)
    ca, sa = math.cos(a), math.sin(a)
    return [(r * (x * ca - y * sa), r * (x * sa + y * ca)) for x, y in pts]


def _draw_object(img: Image.Image, o: SceneObject, *, rng: np.random.Generator) -> None:
    """Paint one object onto ``img`` (the supersampled canvas) through its shape masks."""
    canvas = img.width
    cx, cy, r = o.x * canvas, o.y * canvas, o.radius * canvas
    x0, y0 = int(math.floor(cx - r)) - 2, int(math.floor(cy - r)) - 2
    side = int(math.ceil(2 * r)) + 5
    pts = [(cx + px - x0, cy + py - y0) for px, py in shape_points(o.shape, r, o.rotation)]
    colour = _jitter_rgb(vocab.COLOURS[o.colour], rng)
    mask = Image.new("L", (side, side), 0)
    if o.fill == "solid":
        ImageDraw.Draw(mask).polygon(pts, fill=255)
        img.paste(colour, (x0, y0), mask)
        return
    # a border of even width inside the edge (PIL clips the wide outline to the filled polygon)
    width = OUTLINE_WIDTH * (1.0 if o.size == "large" else 0.85) * (0.4 if o.fill == "striped" else 1.0)
    ring = Image.new("L", (side, side), 0)
    ImageDraw.Draw(ring).polygon(pts, outline=255, width=max(1, int(round(width * canvas))))
    if o.fill == "outline":
        img.paste(colour, (x0, y0), ring)
        return
    # striped: light gaps, then coloured stripes and the thin coloured border on top
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    img.paste(STRIPE_GAP_RGB, (x0, y0), mask)
    a = math.radians(o.rotation + float(rng.choice([0.0, 45.0, 90.0, 135.0])))
    # small objects get two bold stripes: three would be thinner than a pixel at 64 px model input
    period = 2.0 * r / (STRIPES_ACROSS if o.size == "large" else STRIPES_ACROSS - 1)
    u = np.arange(side, dtype=np.float32)
    phase = ((u[None, :] - (cx - x0)) * (math.cos(a) / period) + (u[:, None] - (cy - y0)) * (math.sin(a) / period))
    on = (phase + 0.25) % 1.0 < 0.5  # (h, w); a stripe through the centre
    stripes = np.where(on, np.asarray(mask), 0).astype(np.uint8)
    img.paste(colour, (x0, y0), ImageChops.lighter(Image.fromarray(stripes), ring))


def render_scene(scene: Scene, *, size: int, rng: np.random.Generator,
                 crop: tuple[float, float, float] | None = None) -> Image.Image:
    """Render ``scene`` to a ``size`` x ``size`` RGB image, with blur and noise applied.

    ``crop`` (x0, y0, scale in width fractions) zooms into part of the drawing, as a query view does.
    """
    canvas = size * SUPERSAMPLE
    img = render_background(scene.background.kind, scene.background.colour, size=canvas, rng=rng)
    for o in scene.objects:
        _draw_object(img, o, rng=rng)
    box = (0.0, 0.0, float(canvas), float(canvas))
    if crop is not None:
        x0, y0, s = crop
        box = (x0 * canvas, y0 * canvas, (x0 + s) * canvas, (y0 + s) * canvas)
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    blur = rng.uniform(0.0, MAX_BLUR_AT_128) * size / 128.0
    if blur > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    sigma = rng.uniform(0.0, MAX_NOISE_SIGMA)
    arr = rng.standard_normal(size=(size, size, 3), dtype=np.float32)
    arr *= sigma
    arr += np.asarray(img, dtype=np.float32) + 0.5
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8))


def encode_image(img: Image.Image, *, fmt: str, jpeg_quality: int = 90) -> bytes:
    """The file bytes of ``img`` as ``fmt`` ("jpg" or "png"); deterministic for equal pixels."""
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=jpeg_quality)
    elif fmt == "png":
        img.save(buf, format="PNG", compress_level=1)  # fast; PNGs are a minority
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected 'jpg' or 'png'")
    return buf.getvalue()
