"""Search an indexed collection: text->image, image->image and image->text (the Python API).

    from clipdex.retrieval.store.search import open_collection
    col = open_collection("clipdex-data/db", collection="default")
    hits = col.search_text("a red circle left of a star", k=5)
    hits = col.search_image("query.jpg", k=5)               # similar images
    hits = col.search_captions("query.jpg", k=5)            # captions that describe it
    for h in hits: print(h.rank, h.score, h.path or h.caption)

Without filters a query goes to the FAISS index (exact or approximate, see :mod:`clipdex.retrieval.store.faiss_index`);
with filters (``path_glob``, ``where`` over the columns in
:data:`clipdex.retrieval.store.schema.FILTER_COLUMNS`) it goes to LanceDB
with the filter applied before the vector search, so k results come back whenever k rows match. Scores
are cosine similarities. The encoder is the one recorded in the collection; another is refused.

Re-ranking (text->image): when the collection stores patch-token grids and the model has a matcher
(:mod:`clipdex.retrieval.store.rerank`), ``search_text`` takes the dual encoder's top max(K, k) hits
(K = ``rerank``, :data:`DEFAULT_RERANK` by default, 0 off), orders them by the matcher's probability
(``Hit.match``) and returns the first k; ``Hit.score`` stays the cosine. Without grids or a matcher the
dual encoder's order is kept, and :meth:`SearchCollection.rerank_info` says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipdex.exceptions import ClipdexError, CorruptStoreError
from clipdex.retrieval.store.faiss_index import (
    IndexConfig,
    LoadedIndex,
    is_fresh,
    load_for,
)
from clipdex.retrieval.store.filters import glob_to_like
from clipdex.retrieval.store.record import (
    DEFAULT_COLLECTION,
    Collection,
    Database,
)
from clipdex.retrieval.store.rerank import (
    DEFAULT_RERANK,
    RerankInfo,
    find_matcher_for,
    load_matcher_for,
    match_probabilities,
    matcher_path,
    resolve_rerank,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a microsecond per field
class Hit:
    """One result: ``path`` is set for images, ``caption`` (and ``image_id``) for captions; ``extra`` holds
    the further columns the search was asked for (``columns=``), by name (None: the row is gone).
    ``score`` is the dual encoder's cosine; ``match`` the matcher's probability when the hit was re-ranked
    (None otherwise)."""

    rank: int
    id: str
    score: float
    path: str | None = None
    caption: str | None = None
    image_id: str | None = None
    extra: dict | None = None
    match: float | None = None

    def as_dict(self) -> dict:
        """The JSON shape: rank, id, path, caption, score, match (and image_id for captions)."""
        return {"rank": self.rank, "id": self.id, "path": self.path, "caption": self.caption,
                "score": self.score, "match": self.match} | ({"image_id": self.image_id} if self.image_id else {})


SCORE_LIMIT = 1.01  # cosine of unit vectors, with float error: a score beyond it can only come from damaged data


def _check_scores(hits: list[Hit], *, collection: Collection, table: str) -> None:
    """Refuse to show a score no pair of unit vectors can have: it means damaged data, and says where."""
    for h in hits:
        if not (-SCORE_LIMIT <= h.score <= SCORE_LIMIT):  # also catches NaN
            raise CorruptStoreError(
                f"search of {collection.name}/{table} gave row {h.id!r} the score {h.score:.3g}, which no pair of "
                f"unit vectors can have: the stored vectors (or the FAISS index) are damaged. Run clipdex check "
                f"--db {collection.database.path} --collection {collection.name}")


class SearchCollection:
    """A collection opened for search, with its encoder, FAISS indexes and matcher loaded on first use.

    ``matcher``: a matcher file to re-rank text queries with instead of the one beside the model's weights
    (:func:`clipdex.retrieval.store.rerank.find_matcher`); an explicit file that cannot be used is an error,
    a found one is skipped with a warning and the reason in :meth:`rerank_info`."""

    def __init__(self, collection: Collection, *, model: str | None = None, device: str = "auto",
                 index_config: IndexConfig = IndexConfig(), encoder=None, matcher: str | Path | None = None,
                 runtime: str = "auto"):
        self.collection = collection
        self.runtime = runtime
        self._text_encoder = None  # the exported text tower (no PyTorch), False once found unusable
        self._matcher_file = Path(matcher) if matcher is not None else None
        self._matcher = None  # (LoadedMatcher or None, reason or None), once looked for
        self.info = collection.encoder_info()
        self.device = device
        self.index_config = index_config
        self._encoder = encoder
        self._model = model
        self._indexes: dict[str, LoadedIndex] = {}
        self._checked: dict[str, float] = {}
        if encoder is not None:
            collection.check_encoder(encoder.info)

    @property
    def encoder(self):
        """The dual encoder recorded in the collection (loaded once)."""
        if self._encoder is None:
            from clipdex.retrieval.models.encoder import load_encoder

            enc = load_encoder(self._model or self.info.spec, device=self.device, runtime=self.runtime)
            self.collection.check_encoder(enc.info)
            self._encoder = enc
        return self._encoder

    @property
    def text_encoder(self):
        """What embeds text queries: with runtime ``auto`` or ``onnx``, device ``auto`` or ``cpu`` and the collection's
        own model, a cached export of its text tower that checks out
        (:func:`~clipdex.retrieval.models.onnx_runtime.load_text_encoder`; ``clipdex index`` makes it), run on the CPU
        with no PyTorch, even where a GPU is (one query is a small batch; loading torch and CUDA costs seconds): a
        cold search then skips 3 s of imports. Otherwise :attr:`encoder`."""
        if self._text_encoder is None:
            self._text_encoder = self._exported_text_encoder() or False
        return self._text_encoder or self.encoder

    def _exported_text_encoder(self):
        if self._encoder is not None:  # a model already loaded (or handed in) embeds its own queries
            return None
        if (self.runtime not in ("auto", "onnx") or str(self.device) not in ("auto", "cpu")
                or self._model not in (None, self.info.spec) or not self.info.weights):
            return None
        from clipdex.retrieval.models.onnx_runtime import load_text_encoder

        return load_text_encoder(self.info)

    def index(self, table: str) -> LoadedIndex:
        """The FAISS index of ``table`` ('images' or 'captions'), rebuilt first if stale. Whether the
        table changed (another process indexing into it) is checked at most once per second."""
        now = time.monotonic()
        loaded = self._indexes.get(table)
        if loaded is not None and now - self._checked.get(table, 0.0) > 1.0:
            self._checked[table] = now
            if not is_fresh(self.collection, table, loaded.sidecar, config=self.index_config):
                loaded = None
        if loaded is None:
            loaded = self._indexes[table] = load_for(self.collection, table, config=self.index_config)
            self._checked[table] = now
        return loaded

    # --- queries -------------------------------------------------------------------------------------
    def embed_text(self, text: str) -> np.ndarray:
        """The (D,) embedding of a text query; blank text is refused, and a text longer than the text
        tower's context is cut to it with a warning."""
        self.check_text(text)
        return self.text_encoder.encode_texts([text])[0]

    def check_text(self, text: str) -> None:
        """Refuse a blank text query; warn when it is longer than the text tower reads."""
        if not text or not text.strip():
            raise ClipdexError(f"empty text query {text!r}: type some words to search for (or query with an image)")
        n, context = self.text_encoder.token_count(text), self.text_encoder.context_length
        if n is not None and n > context:
            logger.warning("the text query is longer than %s reads: kept its first %d of %d tokens, the rest is "
                           "ignored", self.info.spec, context, n)

    def embed_image(self, image) -> np.ndarray:
        """The (D,) embedding of an image query: a path or a PIL image."""
        from PIL import Image

        from clipdex.retrieval.models.images import open_rgb  # imports torch, as the image tower does

        im = image if isinstance(image, Image.Image) else open_rgb(image)
        return self.encoder.encode_images([im])[0]

    def search_text(self, text: str, *, k: int = 10, min_score: float | None = None, where: str | None = None,
                    path_glob: str | None = None, rerank: int | None = None) -> list[Hit]:
        """Images best described by ``text`` (blank text is refused). ``rerank`` K (None:
        :data:`DEFAULT_RERANK`, 0: off): when the collection has grids and the model a matcher, the dual
        encoder's top max(K, k) hits (filters and ``min_score`` on the cosine applied first) are ordered by
        the matcher's probability (each hit's ``match``) and the first k returned; otherwise the dual
        encoder's top k, ``match`` None (:meth:`rerank_info` says why)."""
        depth = resolve_rerank(rerank)
        if not depth or not self.rerank_info(depth).used:
            return self.search_vector(self.embed_text(text), table="images", k=k, min_score=min_score, where=where,
                                      path_glob=path_glob)
        self.check_text(text)
        vector, states, mask = self.encoder.text_query(text)  # one text-tower pass for both stages
        hits = self.search_vector(vector, table="images", k=max(k, depth), min_score=min_score, where=where,
                                  path_glob=path_glob)
        return self._rerank((states, mask), hits)[:k]

    def rerank_info(self, rerank: int | None = None) -> RerankInfo:
        """Whether a text search with this ``rerank`` depth is re-ranked, and if not, why (the matcher is
        looked for and loaded on the first call)."""
        depth = resolve_rerank(rerank)
        if not depth:
            return RerankInfo(0, False, "re-ranking is off (rerank 0)")
        matcher, reason = self._reranker()
        return RerankInfo(depth, matcher is not None, reason)

    def _reranker(self):
        """(the loaded matcher, None), or (None, why there is none), looked for once."""
        if self._matcher is None:
            self._matcher = self._find_reranker()
        return self._matcher

    def _find_reranker(self):
        layout = self.collection.grid_layout()
        if layout is None:
            return None, (f"collection {self.collection.name!r} stores no patch-token grids (indexed without them, "
                          "or by an older clipdex): re-index it into a new collection to re-rank")
        if self._matcher_file is not None:  # asked for by name: errors raise
            return load_matcher_for(self.encoder, self._matcher_file, grid=layout), None
        spec = self._model or self.info.spec
        path = find_matcher_for(spec)  # looked for before the model is loaded: most models have none
        if path is None:
            where = matcher_path(spec)
            return None, (f"model {spec!r} has no matcher"
                          + (f" (none at {where})" if where else " (only local weights files have one)"))
        try:
            return load_matcher_for(self.encoder, path, grid=layout), None
        except ClipdexError as e:
            logger.warning("not re-ranking with %s: %s", path, e)
            return None, str(e)

    def _rerank(self, text: tuple, hits: list[Hit]) -> list[Hit]:
        """``hits`` re-ordered by the matcher's probability (ties keep the dual encoder's order), re-numbered,
        each with its ``match``."""
        matcher, _ = self._reranker()
        probs = match_probabilities(matcher, self.encoder, text, self.collection.grids([h.id for h in hits]),
                                    np.array([h.score for h in hits], np.float32))
        possible = (probs >= 0.0) & (probs <= 1.0)  # False for NaN too
        if not possible.all():
            bad = hits[int(np.argmin(possible))].id
            raise CorruptStoreError(
                f"the matcher gave image {bad!r} of {self.collection.name} an impossible probability: its stored grid "
                f"is damaged. Run clipdex check --db {self.collection.database.path} --collection "
                f"{self.collection.name}, or search with rerank 0")
        order = sorted(range(len(hits)), key=lambda i: -probs[i])  # sorted is stable
        out = []
        for rank, i in enumerate(order, 1):
            h = hits[i]
            h.rank, h.match = rank, float(probs[i])
            out.append(h)
        return out

    def search_image(self, image, *, k: int = 10, min_score: float | None = None, where: str | None = None,
                     path_glob: str | None = None) -> list[Hit]:
        """Images most similar to ``image`` (a path or a PIL image)."""
        return self.search_vector(self.embed_image(image), table="images", k=k, min_score=min_score, where=where,
                                  path_glob=path_glob)

    def search_captions(self, image, *, k: int = 10, min_score: float | None = None, where: str | None = None,
                        path_glob: str | None = None) -> list[Hit]:
        """Captions in the collection that best describe ``image``; filters apply to the captions' images."""
        return self.search_vector(self.embed_image(image), table="captions", k=k, min_score=min_score,
                                  where=where, path_glob=path_glob)

    def search_vector(self, vector: np.ndarray, *, table: str = "images", k: int = 10,
                      min_score: float | None = None, where: str | None = None,
                      path_glob: str | None = None, columns: Sequence[str] = ()) -> list[Hit]:
        """Nearest rows of ``table`` to an embedding (already L2-normalised). ``columns``: further columns
        of those rows (e.g. ``("captions", "vector")``) to return in each hit's ``extra``."""
        if k < 1:
            raise ClipdexError(f"k must be at least 1 (got {k})")
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.info.embed_dim:
            raise ClipdexError(f"query vector has {vector.shape[0]} dimensions; the collection has "
                               f"{self.info.embed_dim}")
        if where or path_glob:
            hits = self._filtered(vector, table=table, k=k, where=where, path_glob=path_glob, columns=tuple(columns))
        else:
            hits = self._accelerated(vector, table=table, k=k)
            if columns:
                self._fill(hits, table=table, columns=tuple(columns))
        _check_scores(hits, collection=self.collection, table=table)
        if min_score is not None:
            hits = [h for h in hits if h.score >= min_score]
        return hits

    def _accelerated(self, vector: np.ndarray, *, table: str, k: int) -> list[Hit]:
        idx = self.index(table)
        scores, pos = idx.search(vector[None], k)
        cols = idx.columns
        ids, found = cols["id"], zip(pos[0].tolist(), scores[0].tolist())  # FAISS pads with -1 only at the end
        if table == "images":
            paths = cols["path"]
            return [Hit(r, ids[p], s, paths[p]) for r, (p, s) in enumerate(found, 1) if p >= 0]
        texts, owners = cols["text"], cols["image_id"]
        return [Hit(r, ids[p], s, None, texts[p], owners[p]) for r, (p, s) in enumerate(found, 1) if p >= 0]

    def _fill(self, hits: list[Hit], *, table: str, columns: tuple[str, ...]) -> None:
        """Fetch ``columns`` of the rows FAISS found, by id, into each hit's ``extra``."""
        rows = self.collection.rows([h.id for h in hits], columns=("id", *columns), table=table).to_pylist()
        by_id = {r["id"]: {c: r[c] for c in columns} for r in rows}
        for h in hits:
            h.extra = by_id.get(h.id)

    def _filtered(self, vector: np.ndarray, *, table: str, k: int, where: str | None, path_glob: str | None,
                  columns: tuple[str, ...]) -> list[Hit]:
        clauses = [f"({where})"] if where else []
        if path_glob:
            clauses.append(f"path LIKE '{glob_to_like(path_glob)}'")
        shown = ["id", "path"] if table == "images" else ["id", "image_id", "text"]
        t = self.collection.nearest(table, vector, k=k, where=" AND ".join(clauses),
                                    columns=[*shown, *(c for c in columns if c not in shown)])
        hits = []
        for i, r in enumerate(t.to_pylist(), 1):
            extra = {c: r[c] for c in columns} if columns else None
            if table == "images":
                hits.append(Hit(i, r["id"], r["score"], path=r["path"], extra=extra))
            else:
                hits.append(Hit(i, r["id"], r["score"], caption=r["text"], image_id=r["image_id"], extra=extra))
        return hits


def open_collection(db: str | Path, *, collection: str = DEFAULT_COLLECTION, model: str | None = None,
                    device: str = "auto", index_config: IndexConfig = IndexConfig(),
                    matcher: str | Path | None = None, runtime: str = "auto") -> SearchCollection:
    """Open a collection of a database folder for search (the encoder loads on the first query, its towers run
    by ``runtime``: torch, onnx or auto; see :attr:`SearchCollection.text_encoder`)."""
    return SearchCollection(Database(db).open(collection), model=model, device=device, index_config=index_config,
                            matcher=matcher, runtime=runtime)


__all__ = ["DEFAULT_RERANK", "SCORE_LIMIT", "Hit", "RerankInfo", "SearchCollection", "glob_to_like", "open_collection"]
