"""Claims: the structured meaning of a caption, and checking claims against a scene.

A caption's claims are a list of dicts (stored as JSON in the manifest's ``caption_claims``):

- ``{"type": "object", "shape", "colour", "size", "fill", "cell"}``: one object. ``size`` may be null when
  a size relation fixes it instead; ``cell`` is ``[row, col]`` or null (no position said).
- ``{"type": "relation", "rel", "a", "b"}``: ``rel`` is one of left_of, right_of, above, below (compare
  grid columns/rows), larger_than, smaller_than (compare size classes); ``a``/``b`` are indices into the
  claims list, each pointing at an object claim ("claim a is <rel> claim b").
- ``{"type": "count", "n"}``: the scene has ``n`` objects.
- ``{"type": "background", "kind", "colour"}``.
- ``{"type": "landmark", "landmark_id", "name", "year", "city", "builder"}``: the scene is that landmark.

Captions are complete descriptions, so object claims are matched one-to-one to the scene's objects (an
assignment; brute force over permutations, as a scene has at most 4 objects) and a scene with objects
that no claim mentions does not satisfy the caption.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import permutations

from clipdex.data_manifests.world.scene import Scene, SceneObject

SIZE_RANK = {"small": 0, "large": 1}

RELATIONS: dict[str, Callable[[SceneObject, SceneObject], bool]] = {
    "left_of": lambda a, b: a.col < b.col,
    "right_of": lambda a, b: a.col > b.col,
    "above": lambda a, b: a.row < b.row,
    "below": lambda a, b: a.row > b.row,
    "larger_than": lambda a, b: SIZE_RANK[a.size] > SIZE_RANK[b.size],
    "smaller_than": lambda a, b: SIZE_RANK[a.size] < SIZE_RANK[b.size],
}

LANDMARK_FIELDS = ("landmark_id", "name", "year", "city", "builder")


def as_scene(scene: Scene | dict) -> Scene:
    """Accept a :class:`Scene`, or a manifest row (dict with ``attributes`` and optional ``landmark``)."""
    if isinstance(scene, Scene):
        return scene
    if "attributes" in scene:
        return Scene.from_attributes(scene["attributes"], scene.get("landmark"))
    if "objects" in scene and "background" in scene:
        return Scene.from_attributes(scene)
    raise TypeError(f"expected a Scene or a manifest row with 'attributes', got keys {sorted(scene)}")


def object_matches(claim: dict, obj: SceneObject) -> bool:
    """Does scene object ``obj`` have every attribute object claim ``claim`` states?"""
    if claim["shape"] != obj.shape or claim["colour"] != obj.colour or claim["fill"] != obj.fill:
        return False
    if claim.get("size") is not None and claim["size"] != obj.size:
        return False
    cell = claim.get("cell")
    return cell is None or (int(cell[0]) == obj.row and int(cell[1]) == obj.col)


def _landmark_matches(claim: dict, scene: Scene) -> bool:
    lm = scene.landmark
    return lm is not None and all(getattr(lm, f) == claim[f] for f in LANDMARK_FIELDS)


def count_satisfied(claims: list[dict], scene: Scene | dict) -> tuple[int, int]:
    """(claims satisfied under the best assignment, denominator) of ``claims`` on ``scene``.

    The denominator is the number of claims plus one per scene object beyond the object claims, so
    ``satisfied == denominator`` exactly when the scene satisfies every claim and has no unmentioned object.
    """
    scene = as_scene(scene)
    objs = scene.objects
    obj_claims = [i for i, c in enumerate(claims) if c["type"] == "object"]
    ordinal = {ci: k for k, ci in enumerate(obj_claims)}
    fixed = 0
    rels: list[tuple[Callable, int, int]] = []
    for c in claims:
        kind = c["type"]
        if kind == "background":
            fixed += c["kind"] == scene.background.kind and c["colour"] == scene.background.colour
        elif kind == "count":
            fixed += int(c["n"]) == len(objs)
        elif kind == "landmark":
            fixed += _landmark_matches(c, scene)
        elif kind == "relation":
            if c["rel"] not in RELATIONS:
                raise ValueError(f"unknown relation {c['rel']!r} in claim {c}")
            rels.append((RELATIONS[c["rel"]], ordinal[c["a"]], ordinal[c["b"]]))
        elif kind != "object":
            raise ValueError(f"unknown claim type {kind!r} in claim {c}")
    k, m = len(obj_claims), len(objs)
    ok = [[object_matches(claims[ci], o) for o in objs] for ci in obj_claims]  # (k, m)
    slots: list[int | None] = list(range(m)) + [None] * max(0, k - m)
    best, perfect = 0, k + len(rels)
    for perm in permutations(range(len(slots)), k):
        assigned = [slots[p] for p in perm]
        s = sum(1 for i, a in enumerate(assigned) if a is not None and ok[i][a])
        for rel, i, j in rels:
            ai, aj = assigned[i], assigned[j]
            s += ai is not None and aj is not None and rel(objs[ai], objs[aj])
        if s > best:
            best = s
            if best == perfect:
                break
    return fixed + best, len(claims) + max(0, m - k)


def score(claims: list[dict], scene: Scene | dict) -> float:
    """Graded match in [0, 1]: the fraction of claims satisfied (1.0 exactly when :func:`satisfies`)."""
    got, total = count_satisfied(claims, scene)
    return got / total if total else 1.0


def satisfies(claims: list[dict], scene: Scene | dict) -> bool:
    """True when ``scene`` makes every claim true and has no object the claims leave out."""
    got, total = count_satisfied(claims, scene)
    return got == total
