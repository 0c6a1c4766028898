"""The cross-attention matcher: does this caption describe this image? Re-ranks a dual encoder's top-k.

ALBEF/BLIP-style image-text matching, small: the caption's tokens (the dual encoder's own text tower
states, see :func:`clipdex.retrieval.models.encoder.text_tokens`) are read by the image's
stored patch-token grid (:func:`clipdex.retrieval.models.encoder.image_tokens`, each cell tagged with a
learned position of its own): the cells read the caption, then each other, and a head reads one match logit
from their mean. The dual
encoder's single vector cannot say where things are; the grid keeps where each patch was, so "left of"
becomes a question the matcher can answer. A matcher belongs to one encoder (its fingerprint is recorded)
and is saved as a self-describing safetensors file beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipdex.exceptions import CheckpointError


@dataclass(frozen=True)
class MatcherConfig:
    """Shape of a matcher: ``image_dim``/``text_dim`` are the encoder's token widths, ``cells`` the grid's."""

    image_dim: int
    text_dim: int
    cells: int = 16
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    max_text: int = 77


class _CrossAttention(nn.Module):
    """Cells (B, c, w) attend to caption tokens; keys and values are computed once per distinct caption
    (T, n, w) and gathered for each pair by ``text_index``, so pairing a caption with many images is cheap."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, c: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, text_index: torch.Tensor):
        b, n_c, w = c.shape
        h = self.heads
        k, v = self.kv(text).chunk(2, dim=-1)  # (T, n, w) each
        n = text.shape[1]
        k = k.view(-1, n, h, w // h).transpose(1, 2)[text_index]  # (B, h, n, w/h)
        v = v.view(-1, n, h, w // h).transpose(1, 2)[text_index]
        q = self.q(c).view(b, n_c, h, w // h).transpose(1, 2)
        allowed = mask[text_index][:, None, None, :]  # (B, 1, 1, n)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out(y.transpose(1, 2).reshape(b, n_c, w))


class _Block(nn.Module):
    """Pre-norm: the image cells attend to the caption's tokens, then to each other, then an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross_attn = _CrossAttention(width, heads)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, c: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, text_index: torch.Tensor):
        c = c + self.cross_attn(self.ln1(c), text, mask, text_index)
        h = self.ln2(c)
        c = c + self.self_attn(h, h, h, need_weights=False)[0]
        return c + self.mlp(self.ln3(c))


class Matcher(nn.Module):
    """Match logits for (caption tokens, image grid) pairs; higher means the caption fits the image.

    The queries are the image's cells (each with a learned position), not the caption's tokens: a cell asks
    the caption what should be there, then the cells compare notes, so a pair costs ``cells`` tokens (16)
    whatever the caption's length, and the caption's own context comes from the frozen text tower."""

    def __init__(self, config: MatcherConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.text_in = nn.Linear(config.text_dim, w)
        self.image_in = nn.Linear(config.image_dim, w)
        self.text_pos = nn.Parameter(torch.randn(config.max_text, w) * 0.02)
        self.cell_pos = nn.Parameter(torch.randn(config.cells, w) * 0.02)
        self.text_ln = nn.LayerNorm(w)
        self.blocks = nn.ModuleList([_Block(w, config.heads, config.mlp_ratio) for _ in range(config.layers)])
        self.ln_out = nn.LayerNorm(w)
        self.head = nn.Linear(w, 1)

    def forward(self, text: torch.Tensor, mask: torch.Tensor, grid: torch.Tensor,
                text_index: torch.Tensor | None = None) -> torch.Tensor:
        """``text`` (T, n, text_dim) with ``mask`` (T, n) True on real tokens, ``grid`` (B, cells, image_dim):
        (B,) logits. Pair b is ``grid[b]`` with ``text[text_index[b]]`` (``text[b]`` when no index), so each
        distinct caption is projected once however many images it is paired with."""
        n = text.shape[1]
        t = self.text_ln(self.text_in(text.float()) + self.text_pos[:n])
        if text_index is None:
            text_index = torch.arange(len(grid), device=grid.device)
        c = self.image_in(grid.float()) + self.cell_pos
        for block in self.blocks:
            c = block(c, t, mask, text_index)
        return self.head(self.ln_out(c.mean(dim=1))).squeeze(-1)


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


def match_scores(matcher: Matcher, text: torch.Tensor, mask: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """One caption (1, n, d) against many image grids (K, cells, d): (K,) match probabilities."""
    with torch.no_grad():
        return torch.sigmoid(matcher(text, mask, grids, torch.zeros(len(grids), dtype=torch.long)))


__all__ = ["LoadedMatcher", "Matcher", "MatcherConfig", "load_matcher", "match_scores", "save_matcher"]
