"""The built-in world a grounded-answering decoder is trained and evaluated on, indexed with clipdex.

:func:`prepare_world` generates a world (unless it exists), indexes its corpus into a collection with
clipdex's own indexer, embeds the landmark query views, and retrieves each query's top-N corpus images
through the collection's FAISS index. A corpus image never retrieves itself (leave-one-out). The result,
:class:`WorldData`, is what :mod:`clipdex.retrieval.training.decoder_data` samples training sequences from
and what :mod:`clipdex.retrieval.evaluation.answers` scores the decoder on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

FACT_OF_KIND = {"landmark_name": "name", "landmark_year": "year", "landmark_city": "city",
                "landmark_builder": "builder"}
VISUAL_KINDS = ("count", "colour", "position", "relation")


@dataclass
class WorldData:
    """A world's corpus (as indexed) and query views, with embeddings and retrieved neighbours.

    Corpus arrays are indexed by corpus position; ``corpus_neighbours[i]`` are corpus positions of the
    top-N images for corpus image i (itself excluded); ``view_neighbours[j]`` those of query view j.
    """

    corpus_ids: list[str]
    corpus_paths: list[str]
    corpus_vectors: np.ndarray  # (N, E)
    corpus_captions: list[list[str]]
    corpus_facts: list[dict | None]
    corpus_questions: list[list[dict]]
    corpus_neighbours: np.ndarray  # (N, top_n)
    view_ids: list[str]
    view_paths: list[str]
    view_vectors: np.ndarray  # (V, E)
    view_landmark: list[int]  # corpus position of the view's landmark entry
    view_questions: list[list[dict]]
    view_captions: list[list[str]]
    view_neighbours: np.ndarray  # (V, top_n)
    view_scores: np.ndarray  # (V, top_n) cosine similarity of each neighbour


def facts_of(landmark: dict) -> dict:
    """The four facts of a manifest ``landmark`` struct, as answer strings."""
    return {"name": landmark["name"], "year": str(landmark["year"]), "city": landmark["city"],
            "builder": landmark["builder"]}


def prepare_world(*, world_dir: str | Path, db: str | Path, collection: str, model: str, seed: int,
                  corpus: int, landmarks: int, views: int, top_n: int, progress: bool = True,
                  encoder=None) -> WorldData:
    """Generate (if needed) and index a world, then retrieve every query's top-``top_n`` neighbours."""
    import pyarrow.parquet as pq

    from clipdex.data_manifests.world.generate import WorldConfig, generate_world
    from clipdex.indexer.runner import IndexSettings, run_index
    from clipdex.retrieval.models.encoder import load_encoder
    from clipdex.retrieval.models.images import open_rgb
    from clipdex.retrieval.store.faiss_index import load_for
    from clipdex.retrieval.store.record import Database

    world_dir = Path(world_dir)
    manifest = world_dir / "manifest.parquet"
    if not manifest.exists():
        generate_world(WorldConfig(seed=seed, train=0, test=0, corpus=corpus, landmarks=landmarks,
                                   views_per_landmark=views), out_dir=world_dir, progress=progress)
    enc = encoder or load_encoder(model)  # loaded once, for the index run and the query views
    run_index(IndexSettings(source=str(manifest), split="corpus", db=str(db), collection=collection, model=model),
              progress=progress, encoder=enc)
    col = Database(db).open(collection)
    index = load_for(col, "images")
    rows = pq.read_table(manifest).to_pylist()
    corpus_rows = [r for r in rows if r["split"] == "corpus"]
    view_rows = [r for r in rows if r["split"] == "query"]
    vectors, table = col.vectors("images", ["id"])
    vec_of = dict(zip(table["id"].to_pylist(), vectors))
    # the collection's ids are the manifest ids; corpus position = FAISS row, so neighbours map directly
    ids = list(index.columns["id"])
    paths = list(index.columns["path"])
    row_of = {r["id"]: r for r in corpus_rows}
    missing = [i for i in ids if i not in row_of]
    if missing:
        raise ValueError(f"collection {collection!r} holds images that are not in {manifest} "
                         f"(e.g. {missing[0]}); use a collection of its own for this world")
    corpus_vectors = np.stack([vec_of[i] for i in ids]).astype(np.float32)
    _, nb = index.search(corpus_vectors, top_n + 1)
    corpus_nb = np.stack([[p for p in row if p != i and p >= 0][:top_n] for i, row in enumerate(nb)])
    view_vectors = enc.encode_images([open_rgb(world_dir / r["path"]) for r in view_rows]).astype(np.float32) \
        if view_rows else np.zeros((0, corpus_vectors.shape[1]), np.float32)
    landmark_pos = {row_of[i]["landmark"]["landmark_id"]: p for p, i in enumerate(ids) if row_of[i]["landmark"]}
    if view_rows:
        v_scores, v_nb = index.search(view_vectors, top_n)
    else:
        v_scores, v_nb = np.zeros((0, top_n), np.float32), np.zeros((0, top_n), np.int64)
    return WorldData(
        corpus_ids=ids, corpus_paths=paths, corpus_vectors=corpus_vectors,
        corpus_captions=[row_of[i]["captions"] for i in ids],
        corpus_facts=[facts_of(row_of[i]["landmark"]) if row_of[i]["landmark"] else None for i in ids],
        corpus_questions=[row_of[i]["questions"] for i in ids], corpus_neighbours=corpus_nb,
        view_ids=[r["id"] for r in view_rows], view_paths=[str(world_dir / r["path"]) for r in view_rows],
        view_vectors=view_vectors, view_landmark=[landmark_pos[r["landmark"]["landmark_id"]] for r in view_rows],
        view_questions=[r["questions"] for r in view_rows], view_captions=[r["captions"] for r in view_rows],
        view_neighbours=v_nb, view_scores=v_scores,
    )
