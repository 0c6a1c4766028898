"""Generate the built-in captioned world: images in a photo-library tree plus one Parquet manifest.

Two phases. The main process samples every scene's discrete content in a fixed order (landmarks, train,
test, corpus) and resamples any scene whose signature was already used, so splits never share a scene.
Worker processes then place, render, encode and caption each image with its own generator seeded from
``(seed, split, index)``, so the output is byte-identical whatever the worker count. Rows arrive in id
order and are streamed into the manifest, which is written to a temporary name and renamed at the end.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipdex.data_manifests import schema
from clipdex.data_manifests.world.captions import make_captions
from clipdex.data_manifests.world.landmarks import make_landmark, query_view
from clipdex.data_manifests.world.questions import landmark_questions, visual_questions
from clipdex.data_manifests.world.render import encode_image, render_scene
from clipdex.data_manifests.world.scene import (
    Scene,
    apply_crop,
    crop_box,
    place,
    sample_layout,
)

logger = logging.getLogger(__name__)

SPLITS = ("corpus", "query", "test", "train")  # id order, the order rows are written in
SPLIT_CODES = {"train": 1, "test": 2, "corpus": 3, "query": 4}
SLOT_STREAM = 8
TWIN_STREAM = 9  # RNG stream code for choosing relation-swapped twins  # RNG stream code for where landmarks sit among the corpus images
BATCH_ROWS = 2048  # rows per Parquet row group


@dataclass(frozen=True)
class WorldConfig:
    """What to generate. Counts are images; the same config always gives byte-identical output."""

    seed: int = 0
    train: int = 20000
    test: int = 2000
    corpus: int = 2000  # ordinary corpus scenes; the landmark scenes come on top
    landmarks: int = 50  # landmark scenes (3-4 objects, with facts), in the corpus split
    views_per_landmark: int = 3  # query views of each landmark, in the query split
    captions_per_image: int = 5
    image_size: int = 128  # square, pixels
    workers: int | None = None  # worker processes; None: os.cpu_count(); 0 or 1: in this process
    png_fraction: float = 0.15  # share of images written as PNG (the rest JPEG)
    jpeg_quality: int = 90
    album_size: int = 500  # images per album folder
    twin_fraction: float = 0.0  # share of train scenes followed by a twin (cells swapped or object moved)

    def __post_init__(self) -> None:
        for name in ("train", "test", "corpus", "landmarks", "views_per_landmark"):
            if getattr(self, name) < 0:
                raise ValueError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.captions_per_image < 1:
            raise ValueError(f"WorldConfig.captions_per_image must be >= 1, got {self.captions_per_image}")
        if self.image_size < 32:
            raise ValueError(f"WorldConfig.image_size must be >= 32 pixels, got {self.image_size}")
        if not 0.0 <= self.png_fraction <= 1.0:
            raise ValueError(f"WorldConfig.png_fraction must be in [0, 1], got {self.png_fraction}")
        if not 0.0 <= self.twin_fraction <= 1.0:
            raise ValueError(f"WorldConfig.twin_fraction must be in [0, 1], got {self.twin_fraction}")
        if self.album_size < 1:
            raise ValueError(f"WorldConfig.album_size must be >= 1, got {self.album_size}")



@dataclass(frozen=True)
class Item:
    """One image to make: ``kind`` is "scene", "landmark" (corpus, facts in captions) or "view" (query)."""

    split: str
    index: int
    kind: str
    scene: Scene
    group: int | None = None  # index of the first twin of a relation-swapped pair (train only)


def _unique_scene(draw, used: set, what: str):
    for attempt in range(1000):
        scene = draw(attempt)
        sig = scene.signature()
        if sig not in used:
            used.add(sig)
            return scene
    raise RuntimeError(f"could not draw an unused scene for {what} in 1000 attempts")


def plan_items(config: WorldConfig) -> dict[str, list[Item]]:
    """Every image's scene content, per split; no two train/test/corpus images share a signature."""
    seed, used = config.seed, set()
    names: set[str] = set()
    landmarks = []
    for j in range(config.landmarks):
        lm = _unique_scene(lambda a, j=j: make_landmark(seed, j, taken=names, attempt=a), used, f"landmark {j}")
        names.add(lm.landmark.name)
        landmarks.append(lm)

    def ordinary(split: str, index: int) -> Scene:
        code = SPLIT_CODES[split]
        return _unique_scene(lambda a: sample_layout(np.random.default_rng([seed, code, index, 0, a])), used,
                             f"{split}/{index}")

    items: dict[str, list[Item]] = {}
    items["train"] = _train_items(config, ordinary, used)
    items["test"] = [Item("test", i, "scene", ordinary("test", i)) for i in range(config.test)]
    total = config.corpus + config.landmarks
    slots = np.random.default_rng([seed, SLOT_STREAM]).choice(total, size=config.landmarks, replace=False)
    slot_of = {int(s): j for j, s in enumerate(np.sort(slots))}
    items["corpus"] = [Item("corpus", i, "landmark", landmarks[slot_of[i]]) if i in slot_of
                       else Item("corpus", i, "scene", ordinary("corpus", i)) for i in range(total)]
    v = config.views_per_landmark
    items["query"] = [Item("query", j * v + k, "view", lm) for j, lm in enumerate(landmarks) for k in range(v)]
    return items


def swap_cells(scene: Scene, a: int, b: int) -> Scene:
    """The same scene with objects ``a`` and ``b`` in each other's cells: every relation between them flips."""
    objs = list(scene.objects)
    oa, ob = objs[a], objs[b]
    objs[a], objs[b] = replace(oa, row=ob.row, col=ob.col), replace(ob, row=oa.row, col=oa.col)
    return replace(scene, objects=tuple(objs))


def add_moved_layouts(scene: Scene, rng: np.random.Generator, *, out: list[Scene], seen: set, count: int,
                      max_draws: int | None = None) -> list[Scene]:
    """Append to ``out`` layouts of ``scene``'s objects in other cells (one distinct cell per object, drawn
    at random; a layout whose signature is in ``seen`` is skipped) until it holds ``count`` or ``max_draws``
    draws were made (None: no limit); returns ``out``."""
    n, draws = len(scene.objects), 0
    while len(out) < count and (max_draws is None or draws < max_draws):
        draws += 1
        cells = rng.choice(9, size=n, replace=False)
        moved = replace(scene, objects=tuple(replace(o, row=int(c) // 3, col=int(c) % 3)
                                             for o, c in zip(scene.objects, cells)))
        if moved.signature() not in seen:
            seen.add(moved.signature())
            out.append(moved)
    return out


def _train_items(config: WorldConfig, ordinary, used: set) -> list[Item]:
    """Train scenes; with ``twin_fraction``, a scene may be followed by its twin: two objects' cells swapped
    (every relation between them flips), or a lone object moved to another cell."""
    items: list[Item] = []
    i = 0
    while i < config.train:
        scene = ordinary("train", i)
        rng = np.random.default_rng([config.seed, SPLIT_CODES["train"], i, TWIN_STREAM])
        if i + 1 < config.train and rng.random() < config.twin_fraction:
            if len(scene.objects) >= 2:
                a, b = (int(x) for x in rng.choice(len(scene.objects), size=2, replace=False))
                twin = swap_cells(scene, a, b)
            else:  # one object: the same object in another cell, so position words alone tell them apart
                here = scene.objects[0].row * 3 + scene.objects[0].col
                cell = int(rng.choice([c for c in range(9) if c != here]))
                twin = replace(scene, objects=(replace(scene.objects[0], row=cell // 3, col=cell % 3),))
            if twin.signature() not in used:
                used.add(twin.signature())
                items += [Item("train", i, "scene", scene, group=i), Item("train", i + 1, "scene", twin, group=i)]
                i += 2
                continue
        items.append(Item("train", i, "scene", scene))
        i += 1
    return items


def image_path(config: WorldConfig, split: str, index: int, fmt: str) -> str:
    """The image's path relative to the manifest folder, like a photo library's."""
    return f"images/{split}/album-{index // config.album_size:03d}/IMG_{index:06d}.{fmt}"


_WORKER: dict = {}


def _init_worker(config: WorldConfig, out_dir: str) -> None:
    _WORKER["config"], _WORKER["out_dir"] = config, Path(out_dir)


def make_row(item: Item, config: WorldConfig, out_dir: Path) -> dict:
    """Render, write and caption one item; returns its manifest row."""
    rng = np.random.default_rng([config.seed, SPLIT_CODES[item.split], item.index, 1])
    scene = query_view(item.scene, rng) if item.kind == "view" else item.scene
    scene = place(scene, rng)
    crop = crop_box(scene, rng) if item.kind == "view" else None
    img = render_scene(scene, size=config.image_size, rng=rng, crop=crop)
    if crop is not None:
        scene = apply_crop(scene, crop)
    fmt = "png" if rng.random() < config.png_fraction else "jpg"
    rel = image_path(config, item.split, item.index, fmt)
    dest = out_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(encode_image(img, fmt=fmt, jpeg_quality=config.jpeg_quality))
    captions = make_captions(scene, rng, n=config.captions_per_image, with_landmark=item.kind == "landmark")
    questions = visual_questions(scene, rng) + (landmark_questions(scene) if item.kind == "view" else [])
    return {
        "id": f"{item.split}/{item.index:06d}",
        "path": rel,
        "split": item.split,
        "width": config.image_size,
        "height": config.image_size,
        "captions": [c.text for c in captions],
        "caption_claims": [claims_json(c.claims) for c in captions],
        "foils": [{"caption_index": ci, "kind": kind, "text": text, "claims": claims_json(claims)}
                  for ci, c in enumerate(captions) for kind, text, claims in c.foils],
        "attributes": scene.to_attributes(),
        "questions": questions,
        "landmark": scene.landmark_dict() if item.kind != "scene" else None,
        "group": f"{item.split}/{item.index if item.group is None else item.group:06d}",
    }


def claims_json(claims: list[dict]) -> str:
    """Compact, key-sorted JSON of a claims list (stable bytes)."""
    return json.dumps(claims, separators=(",", ":"), sort_keys=True)


def _make_row_in_worker(item: Item) -> dict:
    return make_row(item, _WORKER["config"], _WORKER["out_dir"])


def _rows(items: list[Item], config: WorldConfig, out_dir: Path, workers: int) -> Iterator[dict]:
    if workers <= 1:
        for item in items:
            yield make_row(item, config, out_dir)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(config, str(out_dir))) as pool:
        yield from pool.imap(_make_row_in_worker, items, chunksize=16)


def _prepare_out_dir(out_dir: Path, *, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) "
                                  "or choose another folder")
        shutil.rmtree(out_dir / "images", ignore_errors=True)
        for name in (schema.MANIFEST_NAME, "world.json"):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def generate_world(config: WorldConfig, *, out_dir: str | Path, progress: bool = True,
                   overwrite: bool = False) -> dict:
    """Generate the world described by ``config`` into ``out_dir``; returns a summary dict.

    Writes ``out_dir/images/...``, ``out_dir/manifest.parquet`` (``schema.WORLD_SCHEMA``) and
    ``out_dir/world.json`` (config and summary). A non-empty ``out_dir`` raises FileExistsError unless
    ``overwrite`` (which replaces the images, manifest and world.json, and leaves other files alone).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite=overwrite)
    workers = config.workers if config.workers is not None else (os.cpu_count() or 1)
    start = time.perf_counter()
    planned = plan_items(config)
    items = [it for split in SPLITS for it in planned[split]]
    logger.info("planned %d images in %.1fs; rendering with %d worker(s)", len(items),
                time.perf_counter() - start, workers)
    manifest = out_dir / schema.MANIFEST_NAME
    tmp = out_dir / f".{schema.MANIFEST_NAME}.tmp-{os.getpid()}"
    # the config in the schema metadata, less `workers`: the output does not depend on it
    content = {k: v for k, v in asdict(config).items() if k != "workers"}
    meta = {"clipdex.world_config": json.dumps(content, sort_keys=True)}
    empty = schema.rows_to_table([], metadata=meta)
    counts: Counter = Counter()
    try:
        with pq.ParquetWriter(tmp, empty.schema, compression="zstd") as writer, \
                tqdm(total=len(items), desc="world", unit="img", disable=not progress) as bar:
            batch: list[dict] = []
            for row in _rows(items, config, out_dir, workers):
                batch.append(row)
                counts[row["split"]] += 1
                bar.update(1)
                if len(batch) == BATCH_ROWS:
                    writer.write_table(schema.rows_to_table(batch, metadata=meta))
                    batch = []
            if batch:
                writer.write_table(schema.rows_to_table(batch, metadata=meta))
        os.replace(tmp, manifest)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    summary = {
        "out_dir": str(out_dir),
        "manifest": str(manifest),
        "world_json": str(out_dir / "world.json"),
        "counts": {s: counts.get(s, 0) for s in ("train", "test", "corpus", "query")},
        "images": len(items),
        "landmarks": config.landmarks,
        "workers": workers,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(items) / seconds, 1) if seconds > 0 else None,
    }
    tmp_json = out_dir / f".world.json.tmp-{os.getpid()}"
    tmp_json.write_text(json.dumps({"config": asdict(config), "summary": summary}, indent=2) + "\n")
    os.replace(tmp_json, out_dir / "world.json")
    logger.info("generated %d images in %.1fs (%.1f images/s)", len(items), seconds, len(items) / seconds)
    return summary
