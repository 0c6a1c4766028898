"""Training sequences for the grounded-answering decoder, drawn from a prepared world.

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

from dataclasses import dataclass

import numpy as np

from clipdex.retrieval.answer.decoder import DecoderConfig
from clipdex.retrieval.answer.prompt import (
    Prompt,
    Sequence,
    add_answer,
    encode_prompt,
    encode_text,
)
from clipdex.retrieval.evaluation.answer_world import FACT_OF_KIND, WorldData


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
