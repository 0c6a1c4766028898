"""Held-out retrieval evaluation: recall@1/5/10 both ways and ARO-style foil accuracy.

Gallery: the first ``gallery`` images of the split, in manifest order. text->image: every caption of
every gallery image queries the gallery images. image->text: every gallery image queries every caption
of the gallery. Identical caption strings are embedded once, so they score identically and the
pessimistic ranking of :mod:`clipdex.metrics` counts such ties against the model.
Foil accuracy: how often an image scores its true caption strictly above the caption's foil
(``relation``: the related objects swapped; ``attribute``: attributes swapped between objects), and the
same split by kind under ``foil.by_kind`` (:func:`foil_kind`): a relation foil is ``spatial`` or ``size`` by
the relation it swaps, and each kind is also split by the scene's object count, because the plain
two-object spatial case must not hide behind the easier ones.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from clipdex.data_manifests.pairs import Pairs
from clipdex.metrics import DEFAULT_KS, ranks_by_owner, recall_at
from clipdex.retrieval.models.encoder import DualEncoder
from clipdex.retrieval.models.images import iter_image_batches

SPATIAL = ("left_of", "right_of", "above", "below")


def foil_kind(pairs: Pairs, image: int, foil: dict) -> tuple[str, int | None]:
    """(kind, object count) of one foil: ``spatial`` or ``size`` for a relation foil (by the relation whose
    objects it swaps), else the foil's own kind; the count is the scene's objects (None when the manifest
    does not say). Manifests without claims keep the plain kind."""
    n = len(pairs.objects[image]) if pairs.objects else None
    kind = foil["kind"]
    if kind != "relation" or not pairs.caption_claims or not foil.get("claims"):
        return kind, n
    mine = json.loads(pairs.caption_claims[image][foil["caption_index"]])
    theirs = json.loads(foil["claims"]) if isinstance(foil["claims"], str) else foil["claims"]
    swapped = [a["rel"] for a, b in zip(mine, theirs) if a.get("type") == "relation" and a != b]
    return ("spatial" if swapped and swapped[0] in SPATIAL else "size"), n


def embed_pairs_images(encoder: DualEncoder, pairs: Pairs, *, batch_size: int = 256,
                       workers: int | None = None) -> np.ndarray:
    """(N, D) image embeddings of ``pairs`` in order."""
    out = [encoder.encode_image_tensors(b).cpu().numpy()
           for b in iter_image_batches(pairs.paths, encoder.preprocess, batch_size=batch_size, workers=workers)]
    return np.concatenate(out)


def embed_unique_texts(encoder: DualEncoder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embed each distinct string once; returns (unique embeddings, index of each text into them)."""
    uniq, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True)
    return encoder.encode_texts(list(uniq)), inverse


def gallery_captions(g: Pairs) -> tuple[list[str], list[int], dict[tuple[int, int], int]]:
    """Every caption of ``g`` in order, each one's image, and (image, caption index) -> its position."""
    texts, owner, cap_pos = [], [], {}
    for i, caps in enumerate(g.captions):
        for j, c in enumerate(caps):
            cap_pos[(i, j)] = len(texts)
            texts.append(c)
            owner.append(i)
    return texts, owner, cap_pos


@dataclass
class GalleryEmbeddings:
    """A gallery embedded once: images, every caption (with its owner image) and the foils."""

    spec: str
    img: np.ndarray  # (N, D)
    texts: list[str]
    owner: np.ndarray  # (C,) index of each caption's image
    txt: np.ndarray  # (C, D); identical strings have identical rows
    cap_pos: dict[tuple[int, int], int]  # (image, caption index) -> row of txt
    foils: list[tuple[int, int, str]]  # (image, caption index, kind)
    foil_kinds: list[tuple[str, int | None]]  # each foil's (kind, object count): see foil_kind
    foil_emb: np.ndarray  # (F, D)


def embed_gallery(encoder: DualEncoder, pairs: Pairs, *, gallery: int = 1000,
                  workers: int | None = None) -> GalleryEmbeddings:
    """Embed the first ``gallery`` images of ``pairs``, their captions and their foils."""
    g = pairs.head(gallery)
    img = embed_pairs_images(encoder, g, workers=workers)
    texts, owner, cap_pos = gallery_captions(g)
    foil_items = [(i, f["caption_index"], f["kind"], f["text"], foil_kind(g, i, f)) for i, fs in enumerate(g.foils)
                  for f in fs if (i, f["caption_index"]) in cap_pos]
    uniq_emb, inverse = embed_unique_texts(encoder, texts + [f[3] for f in foil_items])
    return GalleryEmbeddings(spec=encoder.info.spec, img=img, texts=texts, owner=np.array(owner),
                             txt=uniq_emb[inverse[: len(texts)]], cap_pos=cap_pos,
                             foils=[f[:3] for f in foil_items], foil_kinds=[f[4] for f in foil_items],
                             foil_emb=uniq_emb[inverse[len(texts):]])


def score_gallery(e: GalleryEmbeddings, *, ks=DEFAULT_KS) -> dict:
    """Recall both ways and foil accuracy of an embedded gallery (the JSON contract)."""
    n = len(e.img)
    image_ids = np.arange(n)
    t2i = ranks_by_owner(lambda a, b: e.txt[a:b] @ e.img.T, query_owner=e.owner, gallery_owner=image_ids)
    i2t = ranks_by_owner(lambda a, b: e.img[a:b] @ e.txt.T, query_owner=image_ids, gallery_owner=e.owner)
    right = [float(e.img[i] @ e.txt[e.cap_pos[(i, ci)]]) > float(e.img[i] @ fe)
             for (i, ci, _), fe in zip(e.foils, e.foil_emb)]
    foil = defaultdict(list)
    for (_, _, kind), ok in zip(e.foils, right):
        foil[kind].append(ok)
    return {
        "model": e.spec,
        "gallery": n,
        "t2i": recall_at(t2i, ks),
        "i2t": recall_at(i2t, ks),
        "foil": {**{k: float(np.mean(v)) for k, v in sorted(foil.items())},
                 "by_kind": foil_accuracy_by_kind(e.foil_kinds, right)},
        "foil_count": {k: len(v) for k, v in sorted(foil.items())},
        "queries": {"t2i": int(len(e.texts)), "i2t": int(n)},
    }


def foil_accuracy_by_kind(kinds: list[tuple[str, int | None]], right: list[bool]) -> dict:
    """{kind: {"all": {"accuracy", "count"}, "<objects>": {...}}} from each foil's kind and outcome."""
    cells: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for (kind, n), ok in zip(kinds, right):
        cells[kind]["all"].append(ok)
        if n is not None:
            cells[kind][f"{n} objects"].append(ok)
    return {kind: {k: {"accuracy": round(float(np.mean(v)), 4), "count": len(v)} for k, v in sorted(parts.items())}
            for kind, parts in sorted(cells.items())}


def evaluate_retrieval(encoder: DualEncoder, pairs: Pairs, *, gallery: int = 1000, ks=DEFAULT_KS,
                       workers: int | None = None) -> dict:
    """Recall both ways and foil accuracy on the first ``gallery`` images of ``pairs`` (the JSON contract)."""
    return score_gallery(embed_gallery(encoder, pairs, gallery=gallery, workers=workers), ks=ks)


def format_table(result: dict) -> str:
    """A readable table of an evaluation result (the same numbers as the JSON)."""
    ks = [k for k in result["t2i"]]
    lines = [f"model: {result['model']}   gallery: {result['gallery']} images", "",
             f"{'direction':<14}" + "".join(f"{k:>12}" for k in ks)]
    for d, name in (("t2i", "text->image"), ("i2t", "image->text")):
        lines.append(f"{name:<14}" + "".join(f"{result[d][k]:>12.3f}" for k in ks))
    if result.get("foil"):
        lines += ["", "foil accuracy (true caption scored above its foil):"]
        for kind, acc in result["foil"].items():
            if kind == "by_kind":
                continue
            n = result.get("foil_count", {}).get(kind, "?")
            lines.append(f"  {kind:<12}{acc:>8.3f}   ({n} pairs)")
        by_kind = result["foil"].get("by_kind") or {}
        text_only = (result.get("foil_text_only") or {}).get("by_kind") or {}
        if by_kind:
            lines += ["", "by kind and objects in the scene (chance is 0.5"
                      + ("; text-only: a trigram model of the training captions, no image" if text_only else "")
                      + "):"]
            if text_only:
                lines.append(f"  {'':<22}{'model':>8}{'text-only':>11}")
            for kind, parts in by_kind.items():
                for part, cell in parts.items():
                    blind = text_only.get(kind, {}).get(part)
                    extra = f"{blind['accuracy']:>11.3f}" if blind else (f"{'-':>11}" if text_only else "")
                    lines.append(f"  {kind:<10}{part:<12}{cell['accuracy']:>8.3f}{extra}   ({cell['count']} pairs)")
    rr = result.get("rerank")
    if rr:
        lines += ["", f"re-ranked by the matcher (top {rr['k']}; text->image over the first {rr['text_queries']} "
                  "captions):", f"{'direction':<14}" + "".join(f"{k:>12}" for k in ks)]
        for d, name in (("t2i", "text->image"), ("i2t", "image->text")):
            lines.append(f"{name:<14}" + "".join(f"{rr[d][k]:>12.3f}" for k in ks))
        lines.append(f"  matcher foil accuracy {rr['foil']['all']:.3f} ({rr['foil']['count']} pairs)")
        for kind, parts in rr["foil"]["by_kind"].items():
            for part, cell in parts.items():
                lines.append(f"  {kind:<10}{part:<12}{cell['accuracy']:>8.3f}   ({cell['count']} pairs)")
    return "\n".join(lines)

