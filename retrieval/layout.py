"""A layout head for the image tower: an embedding that knows *where* things are, not only *what*.

A ViT pooled through its class token learns a bag of objects when retrieval can be solved without
positions: measured here, a clipdex-s trained 2,000 steps that way scored 0.52 on captions with two
objects' cells swapped and 0.69 on relation-reversed foils (chance is 0.5), with twin images at cosine
0.975 and "a red circle in the top left" vs "... in the bottom right" at cosine 0.999: a saddle where
neither tower encodes position because the other does not. This head breaks it from initialisation:
the patch tokens are average-pooled to a ``grid`` x ``grid`` map, flattened and projected linearly, so
the same object in another cell lands on other weights. Its output is added to the class-token
embedding. Enabled by ``"clipdex_layout_grid": G`` in a model config (clipdex's key, stripped before
open_clip sees the config).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

LAYOUT_KEY = "clipdex_layout_grid"


class LayoutPool(nn.Module):
    """Patch tokens (B, N, W) -> (B, D): pooled to a grid x grid map, flattened, projected."""

    def __init__(self, *, width: int, grid: int, embed_dim: int):
        super().__init__()
        self.grid = grid
        self.proj = nn.Linear(width * grid * grid, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=(width * grid * grid) ** -0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, w = tokens.shape
        side = int(round(n ** 0.5))
        x = tokens.transpose(1, 2).reshape(b, w, side, side)  # (B, W, side, side)
        x = F.adaptive_avg_pool2d(x, self.grid).flatten(1)  # (B, W * grid * grid)
        return self.proj(x)  # (B, D)


def _forward_with_layout(self, x: torch.Tensor):
    x = self._embeds(x)
    x = self.transformer(x)
    pooled, tokens = self._pool(x)  # tokens: (B, N, W), after ln_post
    if self.proj is not None:
        pooled = pooled @ self.proj
    pooled = pooled + self.layout(tokens)
    if self.output_tokens:
        return pooled, tokens
    return pooled


def add_layout_head(model: nn.Module, *, grid: int) -> None:
    """Give an open_clip ViT image tower the layout head (in place; do it before loading weights)."""
    visual = model.visual
    if not hasattr(visual, "_pool") or getattr(visual, "proj", None) is None:
        raise ValueError(f"{LAYOUT_KEY} needs an open_clip VisionTransformer tower with a projection")
    visual.layout = LayoutPool(width=visual.transformer.width, grid=grid, embed_dim=visual.proj.shape[1])
    visual.forward = types.MethodType(_forward_with_layout, visual)
