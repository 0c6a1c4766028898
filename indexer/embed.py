"""Embed stage: decoded batches and caption texts -> L2-normalised vectors (and, for a collection that stores
them, the images' patch-token grids from the same forward pass), on the encoder's device."""

from __future__ import annotations

import time

import numpy as np
import torch

from clipdex.retrieval.models.encoder import DualEncoder


class Embedder:
    """Wraps a :class:`DualEncoder` and keeps the time spent embedding."""

    def __init__(self, encoder: DualEncoder):
        self.encoder = encoder
        self.seconds = 0.0

    def images(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) preprocessed pixels -> (B, D) float32."""
        t0 = time.perf_counter()
        out = self.encoder.encode_image_tensors(pixels).cpu().numpy()
        self.seconds += time.perf_counter() - t0
        return out

    def images_with_grids(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) preprocessed pixels -> (B, D) float32 embeddings and (B, cells, width) float16
        patch-token grids, from one forward pass (no more work than :meth:`images`)."""
        t0 = time.perf_counter()
        emb, grid = self.encoder.encode_image_grid_tensors(pixels)
        out = emb.numpy(), grid.numpy()
        self.seconds += time.perf_counter() - t0
        return out

    def texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (N, D) float32; each distinct string is embedded once."""
        if not texts:
            return np.zeros((0, self.encoder.info.embed_dim), np.float32)
        t0 = time.perf_counter()
        uniq, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True)
        out = self.encoder.encode_texts(list(uniq))[inverse]
        self.seconds += time.perf_counter() - t0
        return out
