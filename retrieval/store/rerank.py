"""Re-ranking a text query's hits with the cross-attention matcher, which reads the stored patch-token grids.

The dual encoder's single vector per image cannot say where things are; a collection indexed with grids
keeps, for each image, a 4 x 4 grid of the image tower's final patch tokens (see
:mod:`clipdex.retrieval.store.schema`: 8 KiB per image at width 256 in float16, about 7.6 GiB per million
images). A matcher (:mod:`clipdex.retrieval.models.matcher`) reads a caption's token states against a grid
and says how well they match; :class:`clipdex.retrieval.store.search.SearchCollection` uses it to re-order
the dual encoder's top K.

A matcher belongs to one encoder's weights and lives beside them: ``X.matcher.safetensors`` next to the
checkpoint ``X.safetensors`` (the built-in ``clipdex-world``'s is
``retrieval/models/weights/clipdex-world.matcher.safetensors``). One whose recorded encoder fingerprint
differs from the encoder's is refused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipdex.exceptions import CheckpointError, ClipdexError, ModelMismatchError

if TYPE_CHECKING:  # both import torch; this module does not need it until a matcher is loaded
    from clipdex.retrieval.models.encoder import DualEncoder
    from clipdex.retrieval.models.matcher import LoadedMatcher
    from clipdex.retrieval.models.spec import ModelSpec

logger = logging.getLogger(__name__)

DEFAULT_RERANK = 50  # hits of the dual encoder a text search re-ranks by default, when it can
MATCHER_SUFFIX = ".matcher.safetensors"
_CHECKPOINT_IN_FOLDER = ("model.safetensors", "clipdex-world.safetensors")  # what a folder spec loads


@dataclass(frozen=True)
class RerankInfo:
    """What re-ranking does to a text search: ``k`` the depth asked for (0: off), whether it is ``used``,
    and when not, the ``reason`` (no grids in the collection, no matcher for the model, a refused one)."""

    k: int
    used: bool
    reason: str | None = None

    def as_dict(self) -> dict:
        """The JSON shape: k, used, reason."""
        return {"k": self.k, "used": self.used, "reason": self.reason}


def resolve_rerank(rerank: int | None) -> int:
    """The re-ranking depth: None is :data:`DEFAULT_RERANK`, 0 is off; a negative depth is refused."""
    k = DEFAULT_RERANK if rerank is None else int(rerank)
    if k < 0:
        raise ClipdexError(f"rerank must be 0 (off) or a number of hits to re-rank (got {rerank})")
    return k


def grid_layout_for(encoder: "DualEncoder") -> dict | None:
    """The patch-token grid layout ``encoder`` gives (side, cells, width, dtype), from one tiny forward pass,
    or None when its image tower has no patch grid (see ``DualEncoder.has_grid``)."""
    if not encoder.has_grid:
        return None
    import torch

    size = encoder.info.image_size
    _, grid = encoder.encode_image_grid_tensors(torch.zeros(1, 3, size, size))
    cells, width = int(grid.shape[1]), int(grid.shape[2])
    return {"side": math.isqrt(cells), "cells": cells, "width": width, "dtype": "float16"}


def matcher_path(spec: "str | ModelSpec") -> Path | None:
    """Where the matcher of a model spec would be: ``X.matcher.safetensors`` beside the weights file ``X.*``
    of a built-in model, a checkpoint (a folder: its model.safetensors) or an ``ARCH:/path/to/weights``
    spec; None for models with no local weights file (pretrained tags, the hub, random weights)."""
    from clipdex.retrieval.models.spec import parse_model_spec

    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    if spec.kind not in ("builtin", "checkpoint", "arch_file") or spec.path is None:
        return None
    weights = Path(spec.path)
    if weights.is_dir():
        weights = next((weights / n for n in _CHECKPOINT_IN_FOLDER if (weights / n).is_file()),
                       weights / _CHECKPOINT_IN_FOLDER[0])
    return weights.with_name(weights.with_suffix("").name + MATCHER_SUFFIX)


def find_matcher(encoder: "DualEncoder") -> Path | None:
    """The matcher file of ``encoder``'s model (see :func:`matcher_path`) if there is one, else None. Its
    fingerprint is checked when it is loaded (:func:`load_matcher_for`)."""
    return find_matcher_for(encoder.loaded.spec)


def find_matcher_for(spec: "str | ModelSpec") -> Path | None:
    """:func:`find_matcher` from a model spec, before (or without) loading the model."""
    path = matcher_path(spec)
    return path if path is not None and path.is_file() else None


def load_matcher_for(encoder: "DualEncoder", path: str | Path, *, grid: dict | None = None) -> "LoadedMatcher":
    """Load the matcher at ``path`` for ``encoder``, on the CPU; refused (:class:`ModelMismatchError`)
    when it was trained on another encoder's tokens (its recorded ``encoder_weights`` is not
    ``encoder.info.weights``) or, given a collection's ``grid`` layout, reads grids of another shape."""
    from clipdex.retrieval.models.matcher import load_matcher

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"matcher not found: {path}")
    loaded = load_matcher(path)
    want = encoder.info.weights
    if loaded.encoder_weights != want:
        raise ModelMismatchError(
            f"matcher {path} was trained for encoder weights {loaded.encoder_weights or '(none recorded)'!r}, "
            f"but {encoder.info.spec!r} has weights {want!r}: it reads another encoder's tokens and is not used. "
            "Train a matcher for this encoder (or remove the file)")
    cfg = loaded.model.config
    if grid is not None and (cfg.cells, cfg.image_dim) != (grid["cells"], grid["width"]):
        raise ModelMismatchError(
            f"matcher {path} reads grids of {cfg.cells} cells x {cfg.image_dim}, the collection stores "
            f"{grid['cells']} x {grid['width']}: re-index the collection with this clipdex")
    return loaded


def match_probabilities(matcher: "LoadedMatcher", encoder: "DualEncoder", text: tuple, grids: np.ndarray,
                        cosines: np.ndarray) -> np.ndarray:
    """The matcher's probability that a query describes each image: ``text`` is the query's (token
    features, mask) from :meth:`DualEncoder.text_query`, ``grids`` (K, cells, width) float16 as
    :meth:`Collection.grids` gives them and ``cosines`` (K,) the dual encoder's scores of the same images
    -> (K,) float64 in [0, 1]."""
    import torch

    from clipdex.retrieval.models.matcher import match_scores

    if not len(grids):
        return np.zeros(0, np.float64)
    states, mask = text
    if states.shape[-1] != matcher.model.config.text_dim:
        raise ModelMismatchError(f"the matcher reads text states of width {matcher.model.config.text_dim}; "
                                 f"{encoder.info.spec!r} gives {states.shape[-1]}")
    probs = match_scores(matcher.model, states, mask, torch.from_numpy(np.ascontiguousarray(grids)),
                         torch.as_tensor(np.asarray(cosines, np.float32)))
    return probs.double().numpy()


__all__ = ["DEFAULT_RERANK", "MATCHER_SUFFIX", "RerankInfo", "find_matcher", "grid_layout_for", "load_matcher_for",
           "match_probabilities", "matcher_path", "resolve_rerank"]
