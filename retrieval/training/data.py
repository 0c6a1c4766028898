"""Training batches: an image, one of its captions, that caption's foils as extra hard negatives and, for
the built-in world, layout targets of the image and the caption (:mod:`clipdex.retrieval.training.layout`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from clipdex.data_manifests.pairs import Pairs
from clipdex.exceptions import ManifestError
from clipdex.retrieval.models.images import open_rgb
from clipdex.retrieval.training.layout import (
    caption_targets,
    collate_targets,
    image_targets,
)


class CaptionedImages(torch.utils.data.Dataset):
    """Item ``i``: (image tensor, caption, foil texts[, image layout, caption layout]); caption and augmentation
    depend only on (seed, epoch, i), so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, pairs: Pairs, transform: Callable, *, seed: int, hard_negatives: bool, layout: bool = False):
        keep = [i for i, caps in enumerate(pairs.captions) if caps]
        if layout and not (pairs.objects and pairs.caption_claims):
            raise ManifestError(f"{pairs.manifest}: layout supervision needs the world's 'attributes' and "
                                "'caption_claims' columns (a manifest from `clipdex world generate`)")
        if layout:
            keep = [i for i in keep if len(pairs.caption_claims[i]) == len(pairs.captions[i])]
        self.pairs, self.keep = pairs, keep
        self.transform, self.seed, self.hard_negatives, self.layout = transform, seed, hard_negatives, layout
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, k: int):
        i = self.keep[k]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        caps = self.pairs.captions[i]
        j = int(rng.integers(len(caps)))
        foils = []
        if self.hard_negatives and self.pairs.foils:
            foils = [f["text"] for f in self.pairs.foils[i] if f["caption_index"] == j]
        torch.manual_seed(int(rng.integers(2**62)))  # augmentation too is a function of (seed, epoch, i)
        item = (self.transform(open_rgb(self.pairs.paths[i])), caps[j], foils)
        if self.layout:  # RandomResizedCrop keeps at least 85% of the side: positions move by a few percent
            item += (image_targets(self.pairs.objects[i]), caption_targets(self.pairs.caption_claims[i][j]))
        return item

    def group_keys(self) -> list[str] | None:
        """The group of each item (None when the manifest has no groups)."""
        return [self.pairs.groups[i] for i in self.keep] if self.pairs.groups else None


class Collate:
    """Stack images, tokenize captions and foils, batch layout targets (runs in the loader's workers).

    Returns (images, captions, foils or None, foil owners, layout or None); layout is the image targets and
    the caption targets, each as :func:`~clipdex.retrieval.training.layout.collate_targets` makes them."""

    def __init__(self, tokenizer: Callable):
        self.tokenizer = tokenizer

    def __call__(self, items):
        images = torch.stack([it[0] for it in items])  # (B, 3, H, W)
        captions = self.tokenizer([it[1] for it in items])  # (B, L)
        foil_texts = [f for it in items for f in it[2]]
        foils = self.tokenizer(foil_texts) if foil_texts else None  # (F, L) or None
        foil_owner = torch.tensor([b for b, it in enumerate(items) for _ in it[2]], dtype=torch.long)  # (F,)
        layout = None
        if len(items[0]) == 5:
            layout = (collate_targets([it[3] for it in items]), collate_targets([it[4] for it in items]))
        return images, captions, foils, foil_owner, layout


def single_thread_worker(_: int) -> None:
    """DataLoader worker init: one intra-op thread per worker, or N workers x N threads thrash the cores."""
    torch.set_num_threads(1)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of a seeded permutation for one epoch, skipping the first ``skip`` batches (resume).

    With ``groups``, the permutation shuffles groups and keeps each group's items next to each other, so
    twins land in the same batch (except where a group straddles a batch boundary).
    """

    def __init__(self, n: int, *, batch_size: int, seed: int, epoch: int, skip: int = 0,
                 groups: list[str] | None = None):
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        if groups:
            members: dict[str, list[int]] = {}
            for i, key in enumerate(groups):
                members.setdefault(key, []).append(i)
            keys = list(members)
            order = [i for k in torch.randperm(len(keys), generator=g).tolist() for i in members[keys[k]]]
        else:
            order = torch.randperm(n, generator=g).tolist()
        full = n // batch_size  # drop the ragged last batch: contrastive loss wants full batches
        self.batches = [order[b * batch_size:(b + 1) * batch_size] for b in range(skip, full)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
