"""Scenes: what an image shows, as typed values, and how scenes are sampled and placed.

A scene is sampled in two steps so that splits can be kept disjoint cheaply: :func:`sample_layout` picks
the discrete content (background, and each object's shape, colour, size, fill and grid cell) and
:func:`place` adds the continuous jitter (centre, radius, rotation) that the renderer needs. Objects of one
scene occupy distinct cells and differ in (shape, colour), so "the red circle" always names one object.
Coordinates are fractions of the image width: x to the right, y downwards, radius = circumradius.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from clipdex.data_manifests.world import vocab

CELL_MARGIN = 0.012  # free space kept between an object and its cell's border (fraction of width)
MAX_ROTATION = 15.0  # degrees either way, so a square never looks like a diamond


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: discrete attributes, grid cell, and its placement once :func:`place` ran."""

    shape: str
    colour: str
    size: str
    fill: str
    row: int
    col: int
    x: float = 0.0
    y: float = 0.0
    radius: float = 0.0
    rotation: float = 0.0

    def key(self) -> tuple[str, str, str, str, int, int]:
        """The discrete attributes (what captions can say about the object)."""
        return (self.shape, self.colour, self.size, self.fill, self.row, self.col)


@dataclass(frozen=True)
class Background:
    """The backdrop: a pattern ``kind`` in a muted ``colour``."""

    kind: str
    colour: str


@dataclass(frozen=True)
class LandmarkFacts:
    """The facts a landmark's captions and query-view answers carry."""

    landmark_id: int
    name: str
    year: int
    city: str
    builder: str


@dataclass(frozen=True)
class Scene:
    """Everything one image shows; ``landmark`` is set for landmark scenes and their query views."""

    background: Background
    objects: tuple[SceneObject, ...]
    landmark: LandmarkFacts | None = None

    def signature(self) -> tuple:
        """Discrete content, ignoring jitter: two scenes with the same signature count as the same scene."""
        return ((self.background.kind, self.background.colour), tuple(sorted(o.key() for o in self.objects)))

    def to_attributes(self) -> dict:
        """The manifest's ``attributes`` struct."""
        return {
            "background": {"kind": self.background.kind, "colour": self.background.colour},
            "objects": [
                {"shape": o.shape, "colour": o.colour, "size": o.size, "fill": o.fill, "row": o.row,
                 "col": o.col, "x": o.x, "y": o.y, "radius": o.radius, "rotation": o.rotation}
                for o in self.objects
            ],
        }

    def landmark_dict(self) -> dict | None:
        """The manifest's ``landmark`` struct (None for ordinary scenes)."""
        if self.landmark is None:
            return None
        lm = self.landmark
        return {"landmark_id": lm.landmark_id, "name": lm.name, "year": lm.year, "city": lm.city,
                "builder": lm.builder}

    @classmethod
    def from_attributes(cls, attributes: dict, landmark: dict | None = None) -> Scene:
        """Rebuild a scene from a manifest row's ``attributes`` (and optional ``landmark``) structs."""
        bg = attributes["background"]
        objects = tuple(
            SceneObject(shape=o["shape"], colour=o["colour"], size=o["size"], fill=o["fill"],
                        row=int(o["row"]), col=int(o["col"]), x=float(o["x"]), y=float(o["y"]),
                        radius=float(o["radius"]), rotation=float(o["rotation"]))
            for o in attributes["objects"]
        )
        facts = LandmarkFacts(**landmark) if landmark else None
        return cls(background=Background(kind=bg["kind"], colour=bg["colour"]), objects=objects, landmark=facts)


def sample_background(rng: np.random.Generator) -> Background:
    """A uniformly random background kind and colour."""
    kinds, colours = vocab.BACKGROUND_KINDS, tuple(vocab.BACKGROUND_COLOURS)
    return Background(kind=kinds[rng.integers(len(kinds))], colour=colours[rng.integers(len(colours))])


def sample_layout(rng: np.random.Generator, *, n_objects: int | None = None) -> Scene:
    """Sample a scene's discrete content (no placement yet): 1-4 objects in distinct cells.

    ``n_objects`` fixes the object count; otherwise it follows ``vocab.OBJECT_COUNT_PROBS``.
    """
    if n_objects is None:
        n_objects = 1 + int(rng.choice(len(vocab.OBJECT_COUNT_PROBS), p=vocab.OBJECT_COUNT_PROBS))
    if not 1 <= n_objects <= 4:
        raise ValueError(f"n_objects must be 1..4, got {n_objects}")
    cells = rng.choice(9, size=n_objects, replace=False)
    colours = tuple(vocab.COLOURS)
    sizes = tuple(vocab.SIZES)
    objects: list[SceneObject] = []
    used: set[tuple[str, str]] = set()
    for cell in cells:
        while True:  # objects differ in (shape, colour); 64 pairs for at most 4 objects, so this ends fast
            shape = vocab.SHAPES[rng.integers(len(vocab.SHAPES))]
            colour = colours[rng.integers(len(colours))]
            if (shape, colour) not in used:
                break
        used.add((shape, colour))
        objects.append(SceneObject(
            shape=shape, colour=colour, size=sizes[rng.integers(len(sizes))],
            fill=vocab.FILLS[rng.integers(len(vocab.FILLS))], row=int(cell) // 3, col=int(cell) % 3,
        ))
    return Scene(background=sample_background(rng), objects=tuple(objects))


def place(scene: Scene, rng: np.random.Generator) -> Scene:
    """Jitter each object's radius (+-10%), rotation (+-15 deg) and centre, keeping it inside its cell.

    Staying inside distinct cells guarantees that objects never overlap.
    """
    placed = []
    for o in scene.objects:
        radius = vocab.SIZES[o.size] * (1.0 + rng.uniform(-vocab.SIZE_JITTER, vocab.SIZE_JITTER))
        slack = max(0.0, 1.0 / 6.0 - radius - CELL_MARGIN)
        x = (o.col + 0.5) / 3.0 + rng.uniform(-slack, slack)
        y = (o.row + 0.5) / 3.0 + rng.uniform(-slack, slack)
        rotation = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
        placed.append(replace(o, x=float(x), y=float(y), radius=float(radius), rotation=float(rotation)))
    return replace(scene, objects=tuple(placed))


def crop_box(scene: Scene, rng: np.random.Generator, *, min_scale: float = 0.85) -> tuple[float, float, float]:
    """A random square crop (x0, y0, scale), in width fractions, that keeps every object whole."""
    xmin = min(o.x - o.radius for o in scene.objects)
    xmax = max(o.x + o.radius for o in scene.objects)
    ymin = min(o.y - o.radius for o in scene.objects)
    ymax = max(o.y + o.radius for o in scene.objects)
    lo = min(1.0, max(min_scale, xmax - xmin + 0.01, ymax - ymin + 0.01))
    scale = rng.uniform(lo, 1.0)
    x0 = rng.uniform(max(0.0, xmax - scale), max(0.0, min(xmin, 1.0 - scale)))
    y0 = rng.uniform(max(0.0, ymax - scale), max(0.0, min(ymin, 1.0 - scale)))
    return float(x0), float(y0), float(scale)


def apply_crop(scene: Scene, box: tuple[float, float, float]) -> Scene:
    """The scene's coordinates as seen through crop ``box`` (cells, the logical layout, are kept)."""
    x0, y0, s = box
    return replace(scene, objects=tuple(
        replace(o, x=(o.x - x0) / s, y=(o.y - y0) / s, radius=o.radius / s) for o in scene.objects))
