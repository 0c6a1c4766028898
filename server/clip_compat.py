"""clip-retrieval's back-end protocol over clipdex collections, so its clients work against ``clipdex serve``
unchanged: ``GET /indices-list``, ``POST /knn-service``, ``POST /metadata`` (as ``clip_back.py`` answers them).

- A collection is an ``indice_name``. ``modality`` "image" searches its images, "text" its captions.
- The query is one of ``text``, ``image`` (base64 of a file), ``image_url`` or ``embedding_input`` (a vector).
  ``image_url`` is only followed when it is this server's own ``/images/{collection}/{id}`` URL (what the
  front end sends for "similar images"): the server fetches nothing from the network.
- ``num_result_ids`` results are fetched, ``deduplicate`` drops those whose embedding is within cosine 0.94
  of an earlier one (clip-retrieval's rule: in each connected group of near-duplicates the best-ranked
  stays), and the first ``num_images`` are returned, each ``{"id", "similarity", "caption", "url"}`` (plus
  ``path``, and ``image_id`` for captions), ``url`` being this server's ``/images/...`` URL of the image.
- ``use_safety_model``, ``use_violence_detector``, ``aesthetic_score``/``aesthetic_weight`` and ``use_mclip``
  are accepted and ignored (clipdex has no such models).
- Bodies are read as JSON whatever their Content-Type says (the client sends none), as ``clip_back`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlparse

import numpy as np
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from clipdex.app.inputs import InputError, decode_checked
from clipdex.server.state import NotFound, ServerState

DEDUP_COSINE = 0.94  # clip_back's threshold for near-duplicate embeddings


def near_duplicates(vectors: np.ndarray, *, threshold: float = DEDUP_COSINE) -> set[int]:
    """Positions to drop: in each connected group of rows whose cosine is at least ``threshold``, all but the
    first (best-ranked). ``vectors`` (n, d) are L2-normalised."""
    n = len(vectors)
    if n < 2:
        return set()
    close = (vectors @ vectors.T) >= threshold
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(close, 1))):
        a, b = root(int(i)), root(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)  # the group's root is its best-ranked member
    return {i for i in range(n) if root(i) != i}


def _int(data: dict, key: str, default: int, *, low: int, high: int) -> int:
    value = data.get(key, default)
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{key}: a whole number, not {value!r}") from None
    if not low <= n <= high:
        raise InputError(f"{key}: between {low} and {high}")
    return n


def router(state: ServerState, *, image_url: Callable, collection_name: Callable) -> APIRouter:
    """The three clip-retrieval routes over ``state``; ``image_url(base_url, collection, id)`` makes the
    ``url`` of a result and ``collection_name`` resolves an ``indice_name`` (None: the default)."""
    from clipdex.server.bodies import decode_base64, json_object

    settings = state.settings
    api = APIRouter(tags=["clip-retrieval"])

    @api.get("/indices-list", summary="clip-retrieval: the collections served, as index names")
    def indices_list() -> list[str]:
        return state.names()

    @api.post("/knn-service", summary="clip-retrieval: nearest images or captions to a text, image or embedding")
    async def knn_service(request: Request) -> list[dict]:
        data = json_object(await request.body())
        return await run_in_threadpool(_knn, request, data)

    def _own_image(request: Request, url: str):
        """The collection row an ``image_url`` of this server names, or InputError."""
        parsed = urlparse(url)
        base = urlparse(str(request.base_url))
        parts = parsed.path.split("/", 3)
        if parsed.netloc != base.netloc or len(parts) < 4 or parts[1] != "images":
            raise InputError("image_url: this server fetches nothing from the network; send the image as base64 "
                             "(image), or one of its own /images/... URLs")
        loaded = state.collection(state.check_name(parts[2]))
        from urllib.parse import unquote

        image_id = unquote(parts[3])
        if image_id not in loaded.position:
            raise NotFound(f"image_url: no image {image_id!r} in collection {loaded.name!r}")
        return loaded.image(image_id, max_pixels=settings.max_pixels)

    def _knn(request: Request, data: dict) -> list[dict]:
        name = collection_name(data.get("indice_name"))
        modality = data.get("modality") or "image"
        if modality not in ("image", "text"):
            raise InputError(f"modality: 'image' or 'text', not {modality!r}")
        num_images = _int(data, "num_images", 40, low=1, high=settings.max_k)
        depth = max(num_images, _int(data, "num_result_ids", num_images, low=1, high=settings.max_k))
        table = "images" if modality == "image" else "captions"
        text, image, url, vector = (data.get(k) for k in ("text", "image", "image_url", "embedding_input"))
        loaded = state.collection(name)
        search = loaded.search
        if text:
            if not isinstance(text, str) or len(text) > 2000:
                raise InputError("text: a string of at most 2000 characters")
            search.check_text(text)
            query = state.text_batcher.embed(search.encoder, text)
        elif image or url:
            if image:
                raw = decode_base64(str(image), field="image", max_bytes=settings.max_upload_bytes)
                im = decode_checked(raw, label="image", max_pixels=settings.max_pixels)
            else:
                im = _own_image(request, str(url))
            with state.model_lock:
                query = search.embed_image(im)
        elif vector is not None:
            try:
                query = np.asarray(vector, np.float32).reshape(-1)
            except (TypeError, ValueError):
                raise InputError("embedding_input: a list of numbers") from None
        else:
            raise InputError("must fill one of text, image, image_url and embedding_input")
        with state.store_lock:
            hits = search.search_vector(query, table=table, k=depth, columns=("vector",))
        if data.get("deduplicate") and hits:
            vecs = np.stack([np.asarray(h.extra["vector"], np.float32) if h.extra else np.zeros(len(query), np.float32)
                             for h in hits])
            drop = near_duplicates(vecs)
            hits = [h for i, h in enumerate(hits) if i not in drop]
        out = []
        for h in hits[:num_images]:
            if table == "images":
                caps = loaded.captions.get(h.id) or []
                out.append({"id": h.id, "similarity": h.score, "caption": caps[0] if caps else None,
                            "url": image_url(str(request.base_url), name, h.id), "path": h.path})
            else:
                out.append({"id": h.id, "similarity": h.score, "caption": h.caption, "image_id": h.image_id,
                            "url": image_url(str(request.base_url), name, h.image_id)})
        return out

    @api.post("/metadata", summary="clip-retrieval: caption and url of result ids")
    async def metadata(request: Request) -> list[dict]:
        data = json_object(await request.body())
        ids = data.get("ids") or []
        if not isinstance(ids, list) or len(ids) > settings.max_k:
            raise InputError(f"ids: a list of at most {settings.max_k} ids")
        name = collection_name(data.get("indice_name"))
        loaded = await run_in_threadpool(state.collection, name)
        out = []
        for item in ids:
            key = str(item)
            if key in loaded.position:
                caps = loaded.captions.get(key) or []
                meta = {"caption": caps[0] if caps else None, "url": image_url(str(request.base_url), name, key),
                        "path": loaded.path_of(key)}
            else:  # a caption id: "<image id>#<k>"
                owner, _, k = key.rpartition("#")
                caps = loaded.captions.get(owner) or []
                meta = ({"caption": caps[int(k)], "image_id": owner, "url": image_url(str(request.base_url), name, owner)}
                        if owner in loaded.position and k.isdigit() and int(k) < len(caps) else {})
            out.append({"id": item, "metadata": meta})
        return out

    return api
