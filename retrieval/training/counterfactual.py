"""Counterfactual batches: the built-in world rendered on the fly, in groups that differ only in where things are.

Why: among random scenes, *which* objects are present is enough to retrieve the right image, so a dual
encoder trained on them never needs position (the saddle ``retrieval/models/weights/TRAINING.md`` describes).
Here every batch is made of groups. A group is one scene's objects (same shapes, colours, sizes, fills,
background) laid out in ``variants`` different ways: the first two variants of a multi-object group swap
two objects' cells, so every relation between them flips (the foil scene, rendered as an image negative
beside the foil caption); the rest move objects to other cells; a lone object sits in another cell. Each
variant is described by a caption that says where things are (a chain of relations, or each object's cell),
so inside a group only position tells the captions apart, and the contrastive loss must read it from both
towers. Scenes are drawn fresh for every step (seeded by the step), so nothing can be memorised.

A caption can be true of a group-mate too ("the circle left of the star" holds for several layouts): such
pairs are marked in ``also_true`` and left out of the loss's negatives
(:func:`clipdex.retrieval.training.contrastive.contrastive_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from clipdex.data_manifests.world.captions import make_captions
from clipdex.data_manifests.world.claims import satisfies
from clipdex.data_manifests.world.generate import add_moved_layouts, swap_cells
from clipdex.data_manifests.world.render import render_scene
from clipdex.data_manifests.world.scene import Scene, place, sample_layout


@dataclass(frozen=True)
class CounterfactualConfig:
    """How counterfactual batches are drawn. ``object_probs``: the chance of 1..4 objects per group (the
    default leans to two objects, the plainest relation; the world's own mix is ``vocab.OBJECT_COUNT_PROBS``);
    ``relation_prob``: the share of multi-object captions that are relation chains rather than cell lists."""

    groups: int = 32
    variants: int = 4
    image_size: int = 128  # rendered as the world renders its images; the model's preprocessing resizes
    object_probs: tuple[float, ...] = (0.15, 0.45, 0.25, 0.15)
    relation_prob: float = 0.7
    count_prob: float = 0.0  # share of captions in the world's "count" form (objects named, no position)
    seed: int = 0

    @property
    def batch_size(self) -> int:
        """Images per batch: groups x variants."""
        return self.groups * self.variants


def layout_variants(scene: Scene, rng: np.random.Generator, *, count: int) -> list[Scene]:
    """``count`` distinct layouts of ``scene``'s objects (the scene itself first), each object in its own
    cell; for 2+ objects the second swaps two objects' cells. Fewer when the objects have fewer layouts."""
    out, seen = [scene], {scene.signature()}
    n = len(scene.objects)
    if n >= 2:
        a, b = (int(x) for x in rng.choice(n, size=2, replace=False))
        twin = swap_cells(scene, a, b)
        out.append(twin)
        seen.add(twin.signature())
    return add_moved_layouts(scene, rng, out=out, seen=seen, count=count, max_draws=20 * count)


def _form(n_objects: int, rng: np.random.Generator, relation_prob: float, count_prob: float = 0.0) -> str:
    if count_prob and rng.random() < count_prob:
        return "count"
    return "relation" if n_objects >= 2 and rng.random() < relation_prob else "list"


@dataclass
class CounterfactualBatch:
    """One batch: images (B, 3, H, W), captions (B, L) tokens, foils (F, L) or None with their owners (F,),
    ``also_true`` (B, B) bool: caption j is true of image i too (i != j), and the scenes and texts."""

    images: torch.Tensor
    captions: torch.Tensor
    foils: torch.Tensor | None
    foil_owner: torch.Tensor
    also_true: torch.Tensor
    texts: list[str]
    foil_kinds: list[str]
    objects: list[list[dict]]  # each scene's objects as the manifest's attributes.objects (layout targets)
    claims: list[list[dict]]  # each caption's claims
    group: list[int]  # each image's group (group-mates share objects and differ in layout)
    scenes: list[Scene]


class CounterfactualBatches(torch.utils.data.Dataset):
    """Item ``step``: the batch of that training step, a function of (seed, step) only, so a resumed run
    sees exactly the batches an uninterrupted one would. Use with ``DataLoader(batch_size=None)``."""

    def __init__(self, config: CounterfactualConfig, *, transform: Callable, tokenizer: Callable,
                 steps: int, hard_negatives: bool = True):
        self.config, self.transform, self.tokenizer, self.steps = config, transform, tokenizer, steps
        self.hard_negatives = hard_negatives
        self.epoch = 0  # unused: a batch is a function of its step alone (the trainer sets it for every dataset)

    def __len__(self) -> int:
        return self.steps

    def scenes(self, step: int) -> tuple[list[Scene], list[int], np.random.Generator]:
        """The placed scenes of ``step``'s batch, each one's group, and the generator that drew them."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 7, step])
        probs = np.asarray(cfg.object_probs) / np.sum(cfg.object_probs)
        scenes, group = [], []
        g = 0
        while len(scenes) < cfg.batch_size:
            base = sample_layout(rng, n_objects=1 + int(rng.choice(len(probs), p=probs)))
            variants = layout_variants(base, rng, count=min(cfg.variants, cfg.batch_size - len(scenes)))
            scenes += [place(v, rng) for v in variants]
            group += [g] * len(variants)
            g += 1
        return scenes, group, rng

    def __getitem__(self, step: int) -> CounterfactualBatch:
        cfg = self.config
        scenes, group, rng = self.scenes(step)
        torch.manual_seed(int(rng.integers(2**62)))  # the augmentation too is a function of (seed, step)
        images, texts, claims, foils, foil_owner, foil_kinds = [], [], [], [], [], []
        for i, scene in enumerate(scenes):
            images.append(self.transform(render_scene(scene, size=cfg.image_size, rng=rng)))
            form = _form(len(scene.objects), rng, cfg.relation_prob, cfg.count_prob)
            cap = make_captions(scene, rng, n=1, forms=[form])[0]
            texts.append(cap.text)
            claims.append(cap.claims)
            for kind, text, _ in cap.foils if self.hard_negatives else ():
                foils.append(text)
                foil_owner.append(i)
                foil_kinds.append(kind)
        n = len(scenes)
        also_true = torch.zeros((n, n), dtype=torch.bool)
        for i in range(n):  # only group-mates share objects, so only they can make another's caption true
            for j in range(n):
                if i != j and group[i] == group[j] and satisfies(claims[j], scenes[i]):
                    also_true[i, j] = True
        return CounterfactualBatch(
            images=torch.stack(images), captions=self.tokenizer(texts),
            foils=self.tokenizer(foils) if foils else None, foil_owner=torch.tensor(foil_owner, dtype=torch.long),
            also_true=also_true, texts=texts, foil_kinds=foil_kinds,
            objects=[s.to_attributes()["objects"] for s in scenes], claims=claims, group=group, scenes=scenes)


# Curriculum stages: what a stage changes in the batches' config. ``lone``: one object in other cells, so
# position is the only thing a group's captions differ in and no binding is needed; ``pairs``: mostly two
# objects, half the captions relations, half cell lists (which object is where); ``mixed``: 1-4 objects,
# mostly relation chains, some captions in the world's "count" form (what retrieval is measured on).
STAGES: dict[str, dict] = {
    "lone": {"object_probs": (1.0, 0.0, 0.0, 0.0), "relation_prob": 0.0, "count_prob": 0.0},
    "pairs": {"object_probs": (0.3, 0.7, 0.0, 0.0), "relation_prob": 0.5, "count_prob": 0.0},
    "mixed": {"object_probs": (0.15, 0.45, 0.25, 0.15), "relation_prob": 0.7, "count_prob": 0.2},
}


def parse_curriculum(text: str) -> tuple[tuple[str, float], ...]:
    """``"lone:0.2,pairs:0.25,mixed:0.55"`` -> ((stage, share of the steps), ...); the shares must sum to 1.
    An empty text is no curriculum (the batches' own config for every step)."""
    if not text.strip():
        return ()
    out = []
    for part in text.split(","):
        name, sep, share = part.strip().partition(":")
        if name not in STAGES or not sep:
            raise ValueError(f"curriculum stage {part.strip()!r}: expected NAME:SHARE with NAME one of "
                             f"{', '.join(STAGES)} (for example lone:0.2,pairs:0.25,mixed:0.55)")
        try:
            value = float(share)
        except ValueError:
            raise ValueError(f"curriculum stage {part.strip()!r}: {share!r} is not a number") from None
        if not 0 < value <= 1:
            raise ValueError(f"curriculum stage {part.strip()!r}: the share must be in (0, 1]")
        out.append((name, value))
    if abs(sum(v for _, v in out) - 1) > 1e-6:
        raise ValueError(f"curriculum {text!r}: the shares sum to {sum(v for _, v in out):g}, not 1")
    return tuple(out)


class CurriculumBatches(torch.utils.data.Dataset):
    """Counterfactual batches whose config changes with the step: ``stages`` ((name, share), ...) of
    :data:`STAGES` in order, each for its share of ``steps``. Item ``step`` is still a function of (seed,
    step) only, so a resumed run sees the batches an uninterrupted one would."""

    def __init__(self, config: CounterfactualConfig, stages: tuple[tuple[str, float], ...], *,
                 transform: Callable, tokenizer: Callable, steps: int, hard_negatives: bool = True):
        self.steps, self.epoch = steps, 0
        self.stages = [CounterfactualBatches(replace(config, **STAGES[name]), transform=transform,
                                             tokenizer=tokenizer, steps=steps, hard_negatives=hard_negatives)
                       for name, _ in stages]
        self.names = [name for name, _ in stages]
        self.ends = np.cumsum([share for _, share in stages]) * steps

    def __len__(self) -> int:
        return self.steps

    def stage(self, step: int) -> int:
        """The index of the stage ``step`` belongs to."""
        return min(int(np.searchsorted(self.ends, step, side="right")), len(self.stages) - 1)

    def __getitem__(self, step: int) -> CounterfactualBatch:
        return self.stages[self.stage(step)][step]


class TrainingBatch:
    """A :class:`CounterfactualBatch` as the trainer's tuple: (images, captions, foils, foil owners, layout
    or None, also_true); layout is the image and caption targets of
    :mod:`clipdex.retrieval.training.layout`. Runs in the loader's workers (a ``collate_fn``)."""

    def __init__(self, *, layout: bool):
        self.layout = layout

    def __call__(self, b: CounterfactualBatch):
        layout = None
        if self.layout:
            from clipdex.retrieval.training.layout import caption_targets, collate_targets, image_targets

            layout = (collate_targets([image_targets(o) for o in b.objects]),
                      collate_targets([caption_targets(c) for c in b.claims]))
        return b.images, b.captions, b.foils, b.foil_owner, layout, b.also_true
