"""Recall of an indexed collection: the stored vectors scored against a manifest split (same JSON as eval)."""

from __future__ import annotations

import numpy as np

from clipdex.data_manifests.pairs import Pairs
from clipdex.exceptions import StoreError
from clipdex.retrieval.evaluation.recall import GalleryEmbeddings, foil_kind, score_gallery
from clipdex.retrieval.store.record import Collection


def evaluate_collection(collection: Collection, pairs: Pairs, *, gallery: int = 1000, model: str | None = None,
                        device: str = "auto", encoder=None) -> dict:
    """Recall@1/5/10 both ways (and foil accuracy) of the first ``gallery`` images of ``pairs``, using the
    vectors the collection stored for them; foils, which are not stored, are embedded with its encoder
    (``encoder``, an already loaded one, or loaded from ``model`` or the collection's spec)."""
    g = pairs.head(gallery)
    img_vec, img_rows = collection.vectors("images", ["id"])
    pos = {i: n for n, i in enumerate(img_rows["id"].to_pylist())}
    missing = [i for i in g.ids if i not in pos]
    if missing:
        raise StoreError(f"{len(missing)} of {len(g)} gallery images are not in collection {collection.name!r} "
                         f"(e.g. {missing[0]!r}); index that split of {pairs.manifest} first")
    img = img_vec[[pos[i] for i in g.ids]]
    cap_vec, cap_rows = collection.vectors("captions", ["id", "text"])
    cap_pos = {i: n for n, i in enumerate(cap_rows["id"].to_pylist())}
    texts, owner, where, rows = [], [], {}, []
    for n, (image_id, caps) in enumerate(zip(g.ids, g.captions)):
        for k, text in enumerate(caps):
            key = f"{image_id}#{k}"
            if key not in cap_pos:
                raise StoreError(f"caption {key!r} is not in collection {collection.name!r}; re-index the manifest")
            where[(n, k)] = len(texts)
            texts.append(text)
            owner.append(n)
            rows.append(cap_pos[key])
    txt = cap_vec[rows]
    first: dict[str, int] = {}  # identical strings get one identical vector, so ties are exact
    txt = txt[[first.setdefault(t, j) for j, t in enumerate(texts)]]
    foils = [(n, f["caption_index"], f["kind"], f["text"], foil_kind(g, n, f)) for n, fs in enumerate(g.foils)
             for f in fs if (n, f["caption_index"]) in where]
    foil_emb = np.zeros((0, img.shape[1]), np.float32)
    if foils:
        from clipdex.retrieval.models.encoder import load_encoder

        info = collection.encoder_info()
        enc = encoder or load_encoder(model or info.spec, device=device)
        collection.check_encoder(enc.info)
        foil_emb = enc.encode_texts([f[3] for f in foils])
    emb = GalleryEmbeddings(spec=collection.encoder_info().spec, img=img, texts=texts, owner=np.array(owner),
                            txt=txt, cap_pos=where, foils=[f[:3] for f in foils],
                            foil_kinds=[f[4] for f in foils], foil_emb=foil_emb)
    result = score_gallery(emb)
    result["collection"] = collection.name
    return result
