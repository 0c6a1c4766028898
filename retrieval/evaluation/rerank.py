"""What the cross-attention matcher adds: foil accuracy and recall with the dual encoder's top-K re-ranked.

The same gallery as :mod:`clipdex.retrieval.evaluation.recall` (the first ``gallery`` images of a split).
Foils: an image's match score for its true caption must beat the one for the caption's foil, split by kind
and object count as ``foil.by_kind``. Recall: every caption queries the gallery; its top-K images by the
dual encoder are re-ordered by the matcher and the rest keep the dual encoder's order behind them (so
recall@k for k > K cannot change); the same for images querying captions. ``queries`` caps how many text
queries are re-ranked (the first ones, in manifest order) because each costs K matcher passes: the JSON
says how many were used.
"""

from __future__ import annotations

import numpy as np
import torch

from clipdex.data_manifests.pairs import Pairs
from clipdex.metrics import DEFAULT_KS, recall_at
from clipdex.retrieval.evaluation.recall import foil_accuracy_by_kind, foil_kind, gallery_captions
from clipdex.retrieval.models.encoder import DualEncoder
from clipdex.retrieval.models.images import iter_image_batches
from clipdex.retrieval.models.matcher import Matcher


def gallery_grids(encoder: DualEncoder, pairs: Pairs, *, workers: int | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """The normalised embeddings (N, D) and patch-token grids (N, cells, width) of ``pairs``' images."""
    embs, grids = [], []
    for b in iter_image_batches(pairs.paths, encoder.preprocess, batch_size=256, workers=workers):
        e, g = encoder.encode_image_grid_tensors(b)
        embs.append(e.numpy())
        grids.append(g)
    return np.concatenate(embs), torch.cat(grids)


@torch.no_grad()
def _scores(matcher: Matcher, states, mask, grids, cos: np.ndarray, image_index, text_index, *,
            chunk: int = 4096) -> np.ndarray:
    """Matcher logits of (image_index[i], text_index[i]) pairs; ``cos`` (images, texts) the dual encoder's."""
    out = []
    for a in range(0, len(image_index), chunk):
        ii, ti = image_index[a:a + chunk], text_index[a:a + chunk]
        c = torch.from_numpy(cos[ii.numpy(), ti.numpy()])
        out.append(matcher(states, mask, grids[ii], c, ti).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _reranked_rank(order: np.ndarray, rescored: np.ndarray, relevant: np.ndarray) -> int:
    """1-based rank of the first relevant item when ``order[:K]`` is re-sorted by ``rescored`` (ties count
    against the model, as in :mod:`clipdex.metrics`) and the rest follow in the dual encoder's order."""
    k = len(rescored)
    top_rel = relevant[order[:k]]
    if top_rel.any():
        best = rescored[top_rel].max()
        return 1 + int((rescored[~top_rel] >= best).sum())
    rest = np.flatnonzero(relevant[order[k:]])
    return 1 + k + int(rest[0]) if len(rest) else 1 + len(order)


def evaluate_rerank(encoder: DualEncoder, matcher: Matcher, pairs: Pairs, *, gallery: int = 1000, k: int = 50,
                    queries: int | None = 2000, ks=DEFAULT_KS, workers: int | None = None,
                    progress=None) -> dict:
    """Foil accuracy and recall both ways with the matcher re-ranking the dual encoder's top ``k`` (the
    ``rerank`` section of ``clipdex eval retrieval --json``)."""
    g = pairs.head(gallery)
    img, grids = gallery_grids(encoder, g, workers=workers)
    texts, owner, cap_pos = gallery_captions(g)
    owner = np.asarray(owner)
    foils = [(i, f["caption_index"], f["text"], foil_kind(g, i, f)) for i, fs in enumerate(g.foils) for f in fs
             if (i, f["caption_index"]) in cap_pos]
    uniq, inverse = np.unique(np.array(texts + [f[2] for f in foils], dtype=object), return_inverse=True)
    states, mask = encoder.text_states(list(uniq))
    emb = encoder.encode_texts(list(uniq))
    txt = emb[inverse[: len(texts)]]
    cos = (img @ emb.T).astype(np.float32)  # (images, unique texts)
    cap_row = inverse[: len(texts)]
    foil_row = inverse[len(texts):]

    # foils: true caption vs its foil, both scored against the image
    fi = torch.tensor([f[0] for f in foils], dtype=torch.long)
    true_s = _scores(matcher, states, mask, grids, cos, fi, torch.from_numpy(cap_row[[cap_pos[(f[0], f[1])] for f in foils]]))
    foil_s = _scores(matcher, states, mask, grids, cos, fi, torch.from_numpy(foil_row))
    right = list(true_s > foil_s)
    by_kind = foil_accuracy_by_kind([f[3] for f in foils], right)

    # text -> image: re-rank each query's top-k
    n_q = len(texts) if queries is None else min(queries, len(texts))
    sims = txt[:n_q] @ img.T
    t2i = np.empty(n_q, np.int64)
    for q in range(n_q):
        order = np.argsort(-sims[q], kind="stable")
        top = order[:k]
        s = _scores(matcher, states, mask, grids, cos, torch.from_numpy(top), torch.full((len(top),), int(cap_row[q])))
        t2i[q] = _reranked_rank(order, s, np.arange(len(img)) == owner[q])
        if progress:
            progress(1)
    # image -> text
    sims = img @ txt.T
    i2t = np.empty(len(img), np.int64)
    for i in range(len(img)):
        order = np.argsort(-sims[i], kind="stable")
        top = order[:k]
        s = _scores(matcher, states, mask, grids, cos, torch.full((len(top),), i), torch.from_numpy(cap_row[top]))
        i2t[i] = _reranked_rank(order, s, owner == i)
    return {"k": k, "gallery": len(img), "text_queries": int(n_q),
            "t2i": recall_at(t2i, ks), "i2t": recall_at(i2t, ks),
            "foil": {"all": float(np.mean(right)) if right else None, "count": len(right), "by_kind": by_kind}}
