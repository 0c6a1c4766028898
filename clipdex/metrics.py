"""Retrieval metrics where ties never count in the model's favour.

A query's rank is 1 + the number of *irrelevant* gallery items that score at least as high as its best
relevant item. Identical caption strings on different images embed identically, so under this rule they
tie exactly and the tie counts against the model (and against the oracle, which is scored the same way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)


def pessimistic_ranks(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of each row's best relevant column, ties counted against it. ``scores``: (Q, G)."""
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} differ in shape")
    if not relevant.any(axis=1).all():
        raise ValueError("every query needs at least one relevant gallery item")
    best = np.where(relevant, scores, -np.inf).max(axis=1)  # (Q,)
    beaten_or_tied = ((scores >= best[:, None]) & ~relevant).sum(axis=1)  # (Q,)
    return 1 + beaten_or_tied


def ranks_by_owner(
    score_chunk: Callable[[int, int], np.ndarray],
    *,
    query_owner: np.ndarray,
    gallery_owner: np.ndarray,
    chunk: int = 1024,
) -> np.ndarray:
    """Ranks for queries whose relevant items are the gallery items with the same owner id.

    ``score_chunk(start, stop)`` returns the (stop - start, G) scores of queries ``start:stop``, so a
    10,000-image gallery against 50,000 captions never needs the whole matrix in memory.
    """
    out = np.empty(len(query_owner), dtype=np.int64)
    for start in range(0, len(query_owner), chunk):
        stop = min(start + chunk, len(query_owner))
        scores = score_chunk(start, stop)
        relevant = query_owner[start:stop, None] == gallery_owner[None, :]
        out[start:stop] = pessimistic_ranks(scores, relevant)
    return out


def recall_at(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``{"recall@k": fraction of ranks <= k}`` for each k."""
    return {f"recall@{k}": float(np.mean(ranks <= k)) for k in ks}
