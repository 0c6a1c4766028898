"""The oracle: retrieval recall of a "model" that knows each image's true attributes.

It scores a caption against an image with the graded claims score (:func:`.claims.score`), so its
recall is the ceiling the captions allow: a caption that also fits another gallery image ties with it,
and ties count against (:mod:`clipdex.metrics`), exactly as in the model evaluation.

Speed: a caption can only be fully satisfied by an image with the same background, the same set of
(shape, colour) pairs (a 64-bit mask, as there are 8 x 8 pairs) and, for landmark captions, the same
landmark. Those pairs get the exact score; every other pair gets a vectorised proxy that is strictly
below 1 (the fraction of background and (shape, colour) agreement, times 0.99). Ranks, and so recall,
depend only on which items reach the relevant item's score of 1.0, so they are exact.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipdex.data_manifests.world import vocab
from clipdex.data_manifests.world.claims import as_scene, score
from clipdex.metrics import DEFAULT_KS, ranks_by_owner, recall_at

_SHAPE = {s: i for i, s in enumerate(vocab.SHAPES)}
_COLOUR = {c: i for i, c in enumerate(vocab.COLOURS)}
_BG_KIND = {k: i for i, k in enumerate(vocab.BACKGROUND_KINDS)}
_BG_COLOUR = {c: i for i, c in enumerate(vocab.BACKGROUND_COLOURS)}
PROXY_CEILING = 0.99


def _bit(shape: str, colour: str) -> int:
    return 1 << (_SHAPE[shape] * len(_COLOUR) + _COLOUR[colour])


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    bytes_ = x.view(np.uint8).reshape(*x.shape, 8)
    return np.unpackbits(bytes_, axis=-1).sum(axis=-1).astype(np.int64)


def _scene_keys(scenes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mask uint64, background code, object count, landmark id or -1) per scene."""
    mask = np.array([sum(_bit(o.shape, o.colour) for o in s.objects) for s in scenes], dtype=np.uint64)
    bg = np.array([_BG_KIND[s.background.kind] * 16 + _BG_COLOUR[s.background.colour] for s in scenes])
    n = np.array([len(s.objects) for s in scenes])
    lm = np.array([s.landmark.landmark_id if s.landmark else -1 for s in scenes])
    return mask, bg, n, lm


def _claim_keys(claims_list: list[list[dict]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same keys for captions (background code -1 when unsaid, landmark -1 when unsaid)."""
    mask, bg, n, lm = [], [], [], []
    for claims in claims_list:
        m, b, k, l_ = 0, -1, 0, -1
        for c in claims:
            if c["type"] == "object":
                m |= _bit(c["shape"], c["colour"])
                k += 1
            elif c["type"] == "background":
                b = _BG_KIND[c["kind"]] * 16 + _BG_COLOUR[c["colour"]]
            elif c["type"] == "landmark":
                l_ = int(c["landmark_id"])
        mask.append(m)
        bg.append(b)
        n.append(k)
        lm.append(l_)
    return np.array(mask, dtype=np.uint64), np.array(bg), np.array(n), np.array(lm)


def score_matrix(claims_list: list[list[dict]], scenes) -> np.ndarray:
    """(C, N) scores of each caption's claims on each scene: exact where 1.0 is possible, else a proxy < 1."""
    cm, cbg, cn, clm = _claim_keys(claims_list)
    sm, sbg, sn, slm = _scene_keys(scenes)
    common = _popcount(cm[:, None] & sm[None, :])  # (C, N)
    bg_ok = (cbg[:, None] == sbg[None, :]) | (cbg[:, None] < 0)
    lm_ok = (clm[:, None] < 0) | (clm[:, None] == slm[None, :])
    denom = 1.0 + np.maximum(cn[:, None], sn[None, :])
    scores = PROXY_CEILING * (bg_ok + common) / denom
    candidates = bg_ok & lm_ok & (cm[:, None] == sm[None, :]) & (cn[:, None] == sn[None, :])
    for ci, si in zip(*np.nonzero(candidates), strict=True):
        scores[ci, si] = score(claims_list[ci], scenes[si])
    return scores.astype(np.float32)


def gallery_rows(table: pa.Table, *, split: str, gallery: int, seed: int | None = None) -> list[dict]:
    """The gallery: the first ``gallery`` rows of ``split`` by id, or a seeded sample when ``seed`` is set."""
    sub = table.filter(pc.equal(table["split"], split))
    if sub.num_rows == 0:
        raise ValueError(f"no rows with split == {split!r} (splits: {sorted(set(table['split'].to_pylist()))})")
    sub = sub.take(pc.sort_indices(sub["id"]))
    if seed is None:
        idx = np.arange(min(gallery, sub.num_rows))
    else:
        idx = np.sort(np.random.default_rng(seed).choice(sub.num_rows, min(gallery, sub.num_rows), replace=False))
    cols = ["id", "captions", "caption_claims", "foils", "attributes", "landmark"]
    return sub.select(cols).take(pa.array(idx)).to_pylist()


def oracle_recall(table: pa.Table, *, split: str = "test", gallery: int = 1000, seed: int | None = None,
                  ks=DEFAULT_KS) -> dict:
    """Oracle recall@k both ways on ``gallery`` images of ``split`` (same JSON shape as model evaluation).

    t2i: every caption of every gallery image queries the gallery images; i2t: every gallery image
    queries all gallery captions. ``foil`` is the fraction of foils the oracle scores strictly below
    their true caption (1.0 unless a foil is accidentally true).
    """
    rows = gallery_rows(table, split=split, gallery=gallery, seed=seed)
    scenes = [as_scene(r) for r in rows]
    claims, owner = [], []
    for i, r in enumerate(rows):
        for c in r["caption_claims"]:
            claims.append(json.loads(c))
            owner.append(i)
    owner_arr = np.array(owner)
    image_ids = np.arange(len(rows))
    s = score_matrix(claims, scenes)  # (C, N)
    t2i = ranks_by_owner(lambda a, b: s[a:b], query_owner=owner_arr, gallery_owner=image_ids)
    st = np.ascontiguousarray(s.T)  # (N, C)
    i2t = ranks_by_owner(lambda a, b: st[a:b], query_owner=image_ids, gallery_owner=owner_arr)
    foil: dict[str, list[bool]] = {}
    for r, scene in zip(rows, scenes, strict=True):
        for f in r["foils"] or []:
            true = score(json.loads(r["caption_claims"][f["caption_index"]]), scene)
            foil.setdefault(f["kind"], []).append(true > score(json.loads(f["claims"]), scene))
    return {
        "model": "oracle",
        "gallery": len(rows),
        "t2i": recall_at(t2i, ks),
        "i2t": recall_at(i2t, ks),
        "foil": {k: float(np.mean(v)) for k, v in sorted(foil.items())},
        "foil_count": {k: len(v) for k, v in sorted(foil.items())},
        "queries": {"t2i": len(claims), "i2t": len(rows)},
    }
