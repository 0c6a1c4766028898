"""Training and evaluation data for grounded answering, from a built-in world indexed with clipdex.

:func:`prepare_world` generates a world (unless it exists), indexes its corpus into a collection with
clipdex's own indexer, embeds the landmark query views, and retrieves each query's top-N corpus images
through the collection's FAISS index. A corpus image never retrieves itself (leave-one-out).

:class:`ExampleSampler` draws training sequences from it, three kinds mixed:

- **landmark**: a query view and a fact question; the landmark's corpus entry is among the k items
  sampled from its top-N, often beside a *distractor* landmark. **Counterfactual facts**: with
  ``swap_prob`` the landmark's name, year, city and builder are replaced by freshly made-up ones in
  its captions *and* in the target answer (distractors always get made-up facts), so recalling a
  memorised fact is never rewarded and reading the evidence always is.
- **visual** (count, colour, position, relation) and **caption** (the image's own captions as targets,
  SmallCap-style), with **context dropout**: 0 to k retrieved neighbours, so the answer has to come
  from the query image when the neighbours say nothing useful.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipdex.retrieval.answer_prompt import Prompt, Sequence, add_answer, encode_prompt, encode_text
from clipdex.retrieval.decoder import DecoderConfig

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


def random_facts(rng: np.random.Generator) -> dict:
    """Made-up facts drawn like the world's own (same syllable pools), for counterfactual training."""
    from clipdex.data_manifests.world.landmarks import PLACE_KINDS, YEARS, make_word

    return {"name": f"the {make_word(rng, syllables=(1, 2))} {PLACE_KINDS[rng.integers(len(PLACE_KINDS))]}",
            "year": str(int(rng.integers(YEARS[0], YEARS[1] + 1))), "city": make_word(rng, syllables=(2, 3)),
            "builder": f"{make_word(rng, syllables=(2, 2))} {make_word(rng, syllables=(2, 3))}"}


def swap_facts(caption: str, old: dict, new: dict) -> str:
    """``caption`` with each of the ``old`` facts replaced by the ``new`` one (a capitalised name too)."""
    for key in ("name", "builder", "city", "year"):
        caption = caption.replace(old[key], new[key])
        cap_old, cap_new = old[key][:1].upper() + old[key][1:], new[key][:1].upper() + new[key][1:]
        caption = caption.replace(cap_old, cap_new)
    return caption


def prepare_world(*, world_dir: str | Path, db: str | Path, collection: str, model: str, seed: int,
                  corpus: int, landmarks: int, views: int, top_n: int, progress: bool = True,
                  encoder=None) -> WorldData:
    """Generate (if needed) and index a world, then retrieve every query's top-``top_n`` neighbours."""
    import pyarrow.parquet as pq

    from clipdex.data_manifests.world.generate import WorldConfig, generate_world
    from clipdex.indexer.runner import IndexSettings, run_index
    from clipdex.retrieval.encoder import load_encoder
    from clipdex.retrieval.images import open_rgb
    from clipdex.retrieval.index import load_for
    from clipdex.retrieval.store import Database

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
    pos_of = {i: p for p, i in enumerate(index.columns["id"])}
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


@dataclass(frozen=True)
class SamplerConfig:
    """How training sequences are drawn (see the module docstring)."""

    k: int = 5  # retrieved items per sequence, at most
    mix: tuple[float, float, float] = (0.45, 0.35, 0.20)  # landmark, visual, caption
    swap_prob: float = 0.9  # counterfactual facts
    distractor_prob: float = 0.5  # another landmark among the items of a landmark question


class ExampleSampler:
    """Draws training sequences from a :class:`WorldData` (held-out views and corpus images excluded)."""

    def __init__(self, data: WorldData, cfg: DecoderConfig, sampler: SamplerConfig, *, rng: np.random.Generator,
                 heldout_views: set[int] = frozenset(), heldout_corpus: set[int] = frozenset()):
        self.data, self.cfg, self.s, self.rng = data, cfg, sampler, rng
        held_lm = {data.view_landmark[v] for v in heldout_views}
        self.views = [v for v in range(len(data.view_ids)) if v not in heldout_views]
        self.landmarks = sorted({data.view_landmark[v] for v in self.views})
        self.visual = [i for i in range(len(data.corpus_ids)) if i not in heldout_corpus and i not in held_lm]
        self.plain = [i for i in self.visual if data.corpus_facts[i] is None]

    def _caption(self, i: int, facts: dict[int, dict]) -> str:
        d = self.data
        cap = d.corpus_captions[i][int(self.rng.integers(len(d.corpus_captions[i])))]
        if d.corpus_facts[i] is not None:
            cap = swap_facts(cap, d.corpus_facts[i], facts.get(i) or random_facts(self.rng))
        return cap

    def _items(self, chosen: list[int], facts: dict[int, dict]) -> list[tuple[np.ndarray, str]]:
        return [(self.data.corpus_vectors[i], self._caption(i, facts)) for i in chosen]

    def _neighbours(self, nb: np.ndarray, n: int) -> list[int]:
        picks = np.sort(self.rng.choice(len(nb), size=min(n, len(nb)), replace=False))
        return [int(nb[p]) for p in picks]

    def landmark(self) -> Sequence:
        """A fact question about a query view, its landmark among the items."""
        d, rng, k = self.data, self.rng, self.s.k
        v = self.views[int(rng.integers(len(self.views)))]
        right = d.view_landmark[v]
        chosen = [i for i in self._neighbours(d.view_neighbours[v], int(rng.integers(1, k + 1))) if i != right]
        slot = int(rng.integers(len(chosen) + 1))
        chosen.insert(slot, right)
        chosen = chosen[:k] if slot < k else chosen[:k - 1] + [right]
        if rng.random() < self.s.distractor_prob and len(self.landmarks) > 1:
            other = self.landmarks[int(rng.integers(len(self.landmarks)))]
            if other != right and other not in chosen:
                free = [j for j, i in enumerate(chosen) if i != right]
                if free and len(chosen) >= k:
                    chosen[free[int(rng.integers(len(free)))]] = other
                else:
                    chosen.insert(int(rng.integers(len(chosen) + 1)), other)
        facts = {right: random_facts(rng) if rng.random() < self.s.swap_prob else d.corpus_facts[right]}
        qs = [q for q in d.view_questions[v] if q["kind"] in FACT_OF_KIND]
        q = qs[int(rng.integers(len(qs)))]
        prompt = Prompt(q["question"], d.view_vectors[v], self._items(chosen, facts))
        return add_answer(encode_prompt(prompt, self.cfg), encode_text(facts[right][FACT_OF_KIND[q["kind"]]]),
                          teacher_forcing=True)

    def _own(self, pool: list[int]) -> tuple[int, list[tuple[np.ndarray, str]]]:
        d, rng = self.data, self.rng
        i = pool[int(rng.integers(len(pool)))]
        n = int(rng.integers(0, self.s.k + 1))  # context dropout: 0..k neighbours
        return i, self._items(self._neighbours(d.corpus_neighbours[i], n) if n else [], {})

    def visual_question(self) -> Sequence:
        """A count/colour/position/relation question about a corpus image (not itself among the items)."""
        i, items = self._own(self.visual)
        qs = self.data.corpus_questions[i]
        q = qs[int(self.rng.integers(len(qs)))]
        prompt = Prompt(q["question"], self.data.corpus_vectors[i], items)
        return add_answer(encode_prompt(prompt, self.cfg), encode_text(q["answer"]), teacher_forcing=True)

    def caption(self) -> Sequence:
        """One of a corpus image's own captions, from its neighbours' captions (SmallCap-style)."""
        i, items = self._own(self.plain)
        caps = self.data.corpus_captions[i]
        prompt = Prompt(None, self.data.corpus_vectors[i], items)
        return add_answer(encode_prompt(prompt, self.cfg), encode_text(caps[int(self.rng.integers(len(caps)))]),
                          teacher_forcing=True)

    def batch(self, n: int) -> list[Sequence]:
        """``n`` sequences, kinds drawn by ``mix``."""
        makers = (self.landmark, self.visual_question, self.caption)
        kinds = self.rng.choice(3, size=n, p=np.asarray(self.s.mix) / sum(self.s.mix))
        return [makers[int(k)]() for k in kinds]
