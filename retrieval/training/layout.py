"""Layout supervision for training on the built-in world (``clipdex train --layout-weight``).

Why: trained with InfoNCE and foils alone, neither tower learns *where* things are, because retrieval
among random scenes is solved without it; with no layout in the image embedding the relation foils give
the text tower no direction to learn word order, and the reverse: a saddle (see
``retrieval/models/weights/TRAINING.md``). This adds a direct signal to both towers. One linear head, shared by
the two towers, reads from a normalised embedding the (x, y) of each of the world's "entities" (its 8
shapes and 8 colours). Its targets:

- an image: the generator's object centres (fractions of the width, y downwards);
- a caption that gives every object's cell: the cell centres;
- a caption's relation claims ("A left of B"): an ordering, a hinge that wants x_A < x_B by ``MARGIN``.

An entity that names two objects of one scene (two circles) has no target there. Only manifests with the
world's ``attributes`` and ``caption_claims`` columns carry these targets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from clipdex.data_manifests.world import vocab

ENTITIES: tuple[str, ...] = tuple(vocab.SHAPES) + tuple(vocab.COLOURS)
_SHAPE = {s: i for i, s in enumerate(vocab.SHAPES)}
_COLOUR = {c: len(vocab.SHAPES) + i for i, c in enumerate(vocab.COLOURS)}
ORDER_RELATIONS = {"left_of": (0, 1.0), "right_of": (0, -1.0), "above": (1, 1.0), "below": (1, -1.0)}
MARGIN = 0.15  # the smallest gap between cell centres is 1/3 of the width


@dataclass
class LayoutTargets:
    """Per entity (x, y) targets with a mask, and orderings ``(a, b, axis, sign)``: sign*(pos_a - pos_b) < 0."""

    xy: np.ndarray  # (E, 2) float32
    mask: np.ndarray  # (E, 2) float32, 1 where xy is a target
    order: list[tuple[int, int, int, float]] = field(default_factory=list)


def _entities(obj: dict, objects: list[dict]) -> list[int]:
    """The entities that single out ``obj`` among ``objects`` (its shape and/or its colour)."""
    out = []
    if sum(o["shape"] == obj["shape"] for o in objects) == 1:
        out.append(_SHAPE[obj["shape"]])
    if sum(o["colour"] == obj["colour"] for o in objects) == 1:
        out.append(_COLOUR[obj["colour"]])
    return out


def _positions(objects: list[dict], xy: list[tuple[float, float]]) -> LayoutTargets:
    t = np.zeros((len(ENTITIES), 2), np.float32)
    m = np.zeros((len(ENTITIES), 2), np.float32)
    for obj, pos in zip(objects, xy):
        for e in _entities(obj, objects):
            t[e], m[e] = pos, 1.0
    return LayoutTargets(t, m)


def image_targets(objects: list[dict]) -> LayoutTargets:
    """Targets of an image from its manifest ``attributes.objects`` (each with shape, colour, x, y)."""
    return _positions(objects, [(o["x"], o["y"]) for o in objects])


def caption_targets(claims: list[dict] | str) -> LayoutTargets:
    """Targets of a caption from its claims (a list, or the manifest's JSON string)."""
    if isinstance(claims, str):
        claims = json.loads(claims)
    objects = [c for c in claims if c["type"] == "object"]
    if objects and all(c.get("cell") is not None for c in objects):
        cells = [((c["cell"][1] + 0.5) / 3, (c["cell"][0] + 0.5) / 3) for c in objects]
        targets = _positions(objects, cells)
    else:
        targets = LayoutTargets(np.zeros((len(ENTITIES), 2), np.float32), np.zeros((len(ENTITIES), 2), np.float32))
    for c in claims:
        if c["type"] == "relation" and c["rel"] in ORDER_RELATIONS:
            axis, sign = ORDER_RELATIONS[c["rel"]]
            for ea in _entities(claims[c["a"]], objects):
                for eb in _entities(claims[c["b"]], objects):
                    if (ea < len(vocab.SHAPES)) == (eb < len(vocab.SHAPES)):  # shape vs shape, colour vs colour
                        targets.order.append((ea, eb, axis, sign))
    return targets


def collate_targets(items: list[LayoutTargets]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch targets: xy (B, E, 2), mask (B, E, 2), order (K, 5) rows of (item, a, b, axis, sign)."""
    xy = torch.from_numpy(np.stack([t.xy for t in items]))
    mask = torch.from_numpy(np.stack([t.mask for t in items]))
    order = torch.tensor([(b, a, e, axis, sign) for b, t in enumerate(items) for a, e, axis, sign in t.order],
                         dtype=torch.float32).view(-1, 5)
    return xy, mask, order


class LayoutHead(torch.nn.Module):
    """A linear read-out of every entity's (x, y) from a normalised embedding (shared by both towers)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(embed_dim, 2 * len(ENTITIES))
        self.scale = torch.nn.Parameter(torch.tensor(10.0))  # unit-norm inputs need a gain to reach [0, 1]

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised embeddings -> (B, E, 2) positions."""
        return self.proj(emb * self.scale).view(len(emb), len(ENTITIES), 2)

    def loss(self, emb: torch.Tensor, xy: torch.Tensor, mask: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Masked squared error on positions plus the ordering hinge (each a mean; 0 where there is none)."""
        pred = self(emb)  # (B, E, 2)
        loss = ((pred - xy) ** 2 * mask).sum() / mask.sum().clamp(min=1)
        if len(order):
            b, a, e, axis = (order[:, k].long() for k in range(4))
            gap = (pred[b, a, axis] - pred[b, e, axis]) * order[:, 4]  # (K,) should be below -MARGIN
            loss = loss + F.relu(gap + MARGIN).mean()
        return loss
