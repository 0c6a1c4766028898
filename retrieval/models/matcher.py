"""The cross-attention matcher: does this caption describe this image? Re-ranks a dual encoder's top-k.

ALBEF/BLIP-style image-text matching, small: the caption's tokens (the text tower's final states beside the
token embeddings they started from, see :func:`clipdex.retrieval.models.encoder.text_tokens`) attend to each
other and to the image's stored patch-token grid (:func:`clipdex.retrieval.models.encoder.image_tokens`),
and a head reads one match logit from them, added to the dual encoder's own cosine. The dual encoder's single
vector cannot say where things are; the grid keeps where each patch was, and the cross-attention reports
where each word looked, so "left of" becomes a question the matcher can answer. A matcher belongs to one
encoder (its fingerprint is recorded) and is saved as a self-describing safetensors file beside it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from clipdex.exceptions import CheckpointError


@dataclass(frozen=True)
class MatcherConfig:
    """Shape of a matcher: ``image_dim``/``text_dim`` are the widths of the encoder's grid cells and caption
    token features (:func:`~clipdex.retrieval.models.encoder.text_tokens`), ``cells`` the grid's (a square)."""

    image_dim: int
    text_dim: int
    cells: int = 16
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    max_text: int = 77


class _PointingCrossAttention(nn.Module):
    """Caption tokens (B, n, w) attend to image cells (B, c, w). Besides what they read, each head reports
    *where* it looked: the attention-weighted (x, y) of the cells, in [-1, 1]. So a word that found the red
    circle carries the circle's position, and the next layer's self-attention can compare it with the
    position of the word that found the star: "left of" becomes a comparison of two numbers."""

    def __init__(self, width: int, heads: int, side: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.where = nn.Linear(2 * heads, width)
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        coords = torch.stack([xs.flatten(), ys.flatten()], -1).float() / max(side - 1, 1) * 2 - 1
        self.register_buffer("coords", coords, persistent=False)  # (cells, 2), row-major from the top left

    def forward(self, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, n, w = t.shape
        h = self.heads
        q = self.q(t).view(b, n, h, w // h).transpose(1, 2)
        k, v = self.kv(c).chunk(2, dim=-1)
        k = k.view(b, -1, h, w // h).transpose(1, 2)
        v = v.view(b, -1, h, w // h).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) * (w // h) ** -0.5, dim=-1)  # (b, h, n, cells)
        read = (a @ v).transpose(1, 2).reshape(b, n, w)
        where = (a @ self.coords).transpose(1, 2).reshape(b, n, 2 * h)
        return self.out(read) + self.where(where)


class _Block(nn.Module):
    """Pre-norm: the caption's tokens attend to each other, then to the image cells, then an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, side: int):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = _PointingCrossAttention(width, heads, side)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, t: torch.Tensor, pad: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.ln1(t)
        t = t + self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        t = t + self.cross_attn(self.ln2(t), c)
        return t + self.mlp(self.ln3(t))


class Matcher(nn.Module):
    """Match logits for (caption tokens, image grid, dual-encoder cosine) triples; higher means a better fit.

    ALBEF/BLIP's shape: the caption's tokens are the queries and read the image's cells (each with a learned
    position and a fixed coordinate the attention reports, see :class:`_PointingCrossAttention`). The logit is
    ``scale * cosine + bias`` plus what the cross-attention adds, so the matcher starts from the dual
    encoder's judgement (which objects are there) and learns only what it misses (where they are)."""

    def __init__(self, config: MatcherConfig):
        super().__init__()
        self.config = config
        w = config.width
        side = math.isqrt(config.cells)
        if side * side != config.cells:
            raise ValueError(f"a matcher's grid must be square; got {config.cells} cells")
        self.text_in = nn.Linear(config.text_dim, w)
        self.image_in = nn.Linear(config.image_dim, w)
        self.text_pos = nn.Parameter(torch.randn(config.max_text, w) * 0.02)
        self.cell_pos = nn.Parameter(torch.randn(config.cells, w) * 0.02)
        self.image_ln = nn.LayerNorm(w)
        self.blocks = nn.ModuleList([_Block(w, config.heads, config.mlp_ratio, side) for _ in range(config.layers)])
        self.ln_out = nn.LayerNorm(w)
        self.head = nn.Linear(w, 1)
        self.cos_scale = nn.Parameter(torch.tensor(10.0))
        self.cos_bias = nn.Parameter(torch.tensor(-7.0))

    def forward(self, text: torch.Tensor, mask: torch.Tensor, grid: torch.Tensor, cos: torch.Tensor,
                text_index: torch.Tensor | None = None) -> torch.Tensor:
        """``text`` (T, n, text_dim) with ``mask`` (T, n) True on real tokens, ``grid`` (B, cells, image_dim),
        ``cos`` (B,) the dual encoder's cosine of each pair: (B,) logits. Pair b is ``grid[b]`` with
        ``text[text_index[b]]`` (``text[b]`` when no index), so each caption is projected once."""
        n = text.shape[1]
        if text_index is None:
            text_index = torch.arange(len(grid), device=grid.device)
        t = (self.text_in(text.float()) + self.text_pos[:n])[text_index]
        m = mask[text_index]
        c = self.image_ln(self.image_in(grid.float()) + self.cell_pos)
        for block in self.blocks:
            t = block(t, ~m, c)
        t = self.ln_out(t)
        pooled = (t * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        return self.head(pooled).squeeze(-1) + self.cos_scale * cos.float() + self.cos_bias


def save_matcher(matcher: Matcher, path: Path, *, encoder_weights: str, record: dict | None = None) -> None:
    """Write ``matcher`` as safetensors with its config, its encoder's fingerprint and a training record."""
    import json

    from safetensors.torch import save_file

    from clipdex.files import atomic_write

    meta = {"clipdex_matcher": json.dumps(asdict(matcher.config)), "encoder_weights": encoder_weights,
            "record": json.dumps(record or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in matcher.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


@dataclass
class LoadedMatcher:
    """A matcher ready for inference and the fingerprint of the encoder whose tokens it reads."""

    model: Matcher
    encoder_weights: str
    record: dict


def load_matcher(path: Path) -> LoadedMatcher:
    """Load a matcher file written by :func:`save_matcher`; raises CheckpointError naming the file."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "clipdex_matcher" not in meta:
            raise CheckpointError(f"{path}: not a clipdex matcher (no config inside)")
        model = Matcher(MatcherConfig(**json.loads(meta["clipdex_matcher"])))
        model.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load matcher {path}: {e}") from e
    return LoadedMatcher(model=model.eval(), encoder_weights=meta.get("encoder_weights", ""),
                         record=json.loads(meta.get("record", "{}")))


def match_scores(matcher: Matcher, text: torch.Tensor, mask: torch.Tensor, grids: torch.Tensor,
                 cos: torch.Tensor) -> torch.Tensor:
    """One caption (1, n, d) against many image grids (K, cells, d) whose dual-encoder cosines with it are
    ``cos`` (K,): (K,) match probabilities."""
    with torch.no_grad():
        return torch.sigmoid(matcher(text, mask, grids, cos, torch.zeros(len(grids), dtype=torch.long)))


__all__ = ["LoadedMatcher", "Matcher", "MatcherConfig", "load_matcher", "match_scores", "save_matcher"]
