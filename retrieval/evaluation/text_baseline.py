"""The text-only foil baseline: can the foils be told from the true captions without looking at the image?

SugarCrepe (Hsieh et al., 2023) found that many compositional benchmarks' foils are ungrammatical or
improbable sentences, so a model that never looks at the image beats chance on them. A foil benchmark is
only worth its numbers if a language model of the *training* captions, shown the caption and its foil and
no image, is near chance (0.5). This module fits such a model and scores the same foils as
:func:`clipdex.retrieval.evaluation.recall.evaluate_retrieval`.

The language model: a word-level trigram model with interpolated Kneser-Ney smoothing (one absolute
discount ``D`` at every order; the lower orders use continuation counts; the unigram level is mixed with a
small uniform floor so a word never seen in training still has a probability). It is fitted on the captions
of ``scenes`` training scenes drawn exactly as ``clipdex world generate --seed 0`` plans them (the encoder's
training world: :func:`clipdex.data_manifests.world.generate.plan_items`), captioned by
:func:`clipdex.data_manifests.world.captions.make_captions` with the forms its default picks (what the
generator's ``make_row`` calls: :func:`~clipdex.data_manifests.world.captions.caption_forms`). Nothing is
rendered, so fitting costs only caption generation (about 1 ms a scene: some 20-60 s for the default 20,000,
which is why ``clipdex eval retrieval`` runs it only with ``--text-baseline``).

Two scorers: the caption's total log-probability, and the same divided by its token count. The world's
foils move or swap the caption's own words, so a foil has its caption's token count and the two scorers
agree up to float rounding; both are kept so that a foil kind that changes the length cannot hide behind
the wrong one. A careful adversary picks whichever is better, so ``by_kind``
reports, per cell, the *higher* accuracy of the two (``scorer`` says which won); ``total`` and
``per_token`` hold each scorer's own table. The baseline is right on a foil when the true caption scores
strictly higher; a tie (rare: the swapped words have to leave every trigram's probability unchanged) counts
as half right, a coin flip, which is what an adversary would get from it; ``ties`` counts them.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from clipdex.data_manifests.pairs import Pairs
from clipdex.data_manifests.world.captions import make_captions
from clipdex.data_manifests.world.generate import SPLIT_CODES, WorldConfig, plan_items
from clipdex.retrieval.evaluation.recall import foil_accuracy_by_kind, foil_kind, gallery_captions

BOS, EOS = "<s>", "</s>"
_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


@dataclass(frozen=True)
class TextBaselineConfig:
    """Which training captions the language model is fitted on, and its smoothing.

    ``seed`` is the world seed the encoder was trained on (0); ``scenes`` training scenes are planned as the
    generator plans them (``twin_fraction`` as its ``--twins``) and given ``captions_per_image`` captions
    each. ``discount`` is Kneser-Ney's absolute discount (0.75 is the usual choice); ``floor`` the weight of
    the uniform distribution mixed into the unigram level (words never seen in training)."""

    scenes: int = 20000
    seed: int = 0
    captions_per_image: int = 5
    twin_fraction: float = 0.0
    discount: float = 0.75
    floor: float = 1e-4


def tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of ``text`` ("a red circle, on" -> a, red, circle, ",", on)."""
    return _TOKEN.findall(text.lower())


def training_captions(*, config: TextBaselineConfig) -> Iterator[str]:
    """The caption texts of ``config.scenes`` training scenes of world seed ``config.seed``, in id order.

    Scenes come from the generator's own plan (so the same scenes, resampling and twins as ``clipdex world
    generate``); each scene's captions use the generator's seeding of its caption stream, less rendering (so
    the same distribution of captions, not byte-identical strings)."""
    world = WorldConfig(seed=config.seed, train=config.scenes, test=0, corpus=0, landmarks=0,
                        views_per_landmark=0, captions_per_image=config.captions_per_image,
                        twin_fraction=config.twin_fraction)
    for item in plan_items(world)["train"]:
        rng = np.random.default_rng([config.seed, SPLIT_CODES["train"], item.index, 1])
        for cap in make_captions(item.scene, rng, n=config.captions_per_image):
            yield cap.text


class TrigramLM:
    """A word trigram language model with interpolated Kneser-Ney smoothing (see the module docstring).

    Fit with :meth:`fit`; :meth:`logprob` gives a sentence's total natural-log probability, end marker
    included (so a sentence's length counts)."""

    def __init__(self, *, discount: float = 0.75, floor: float = 1e-4):
        if not 0.0 < discount < 1.0:
            raise ValueError(f"discount must be in (0, 1), got {discount}")
        self.discount, self.floor = discount, floor
        self.tri: Counter = Counter()  # (u, v, w) -> count
        self.ctx2: Counter = Counter()  # (u, v) -> count of (u, v, *)
        self.types2: Counter = Counter()  # (u, v) -> distinct w after (u, v)
        self.cont2: Counter = Counter()  # (v, w) -> distinct u before (v, w)
        self.cont2_ctx: Counter = Counter()  # v -> sum over w of cont2[(v, w)]
        self.types1: Counter = Counter()  # v -> distinct w with cont2[(v, w)] > 0
        self.cont1: Counter = Counter()  # w -> distinct v before w
        self.cont1_total = 0
        self.vocab: set[str] = set()
        self.sentences = 0
        self.source: dict = {}  # what it was fitted on (fit_training_lm fills it in)

    def fit(self, texts: Iterable[str]) -> TrigramLM:
        """Count the trigrams of ``texts`` (each padded with two start markers and an end marker)."""
        for text in texts:
            toks = [BOS, BOS, *tokenize(text), EOS]
            self.vocab.update(toks[2:])
            self.tri.update(zip(toks, toks[1:], toks[2:]))
            self.sentences += 1
        for u, v, w in self.tri:
            self.ctx2[(u, v)] += self.tri[(u, v, w)]
            self.types2[(u, v)] += 1
            self.cont2[(v, w)] += 1
        for v, w in self.cont2:
            self.cont2_ctx[v] += self.cont2[(v, w)]
            self.types1[v] += 1
            self.cont1[w] += 1
        self.cont1_total = sum(self.cont1.values())
        return self

    def _p1(self, w: str) -> float:
        uniform = 1.0 / (len(self.vocab) + 1)  # + 1: one slot for every unseen word together
        cont = self.cont1[w] / self.cont1_total if self.cont1_total else 0.0
        return (1.0 - self.floor) * cont + self.floor * uniform

    def _p2(self, v: str, w: str) -> float:
        total = self.cont2_ctx[v]
        if not total:
            return self._p1(w)
        d = self.discount
        return max(self.cont2[(v, w)] - d, 0.0) / total + d * self.types1[v] / total * self._p1(w)

    def prob(self, u: str, v: str, w: str) -> float:
        """P(w | u v), interpolated down to the unigram level."""
        total = self.ctx2[(u, v)]
        if not total:
            return self._p2(v, w)
        d = self.discount
        return max(self.tri[(u, v, w)] - d, 0.0) / total + d * self.types2[(u, v)] / total * self._p2(v, w)

    def logprob(self, text: str) -> tuple[float, int]:
        """(total natural-log probability, tokens scored) of ``text``, its end marker included."""
        toks = [BOS, BOS, *tokenize(text), EOS]
        lp = sum(math.log(self.prob(u, v, w)) for u, v, w in zip(toks, toks[1:], toks[2:]))
        return lp, len(toks) - 2


def fit_training_lm(*, config: TextBaselineConfig) -> TrigramLM:
    """The trigram model of the training world's captions that ``config`` describes."""
    lm = TrigramLM(discount=config.discount, floor=config.floor).fit(training_captions(config=config))
    lm.source = {"seed": config.seed, "scenes": config.scenes, "twin_fraction": config.twin_fraction}
    return lm


def _outcome(true_score: float, foil_score: float) -> float:
    return 1.0 if true_score > foil_score else 0.5 if true_score == foil_score else 0.0


def text_only_foils(lm: TrigramLM, pairs: Pairs, *, gallery: int = 1000) -> dict:
    """The text-only baseline on the foils of the first ``gallery`` images of ``pairs`` (the foils
    ``clipdex eval retrieval`` scores): ``by_kind`` in :func:`~clipdex.retrieval.evaluation.recall.
    foil_accuracy_by_kind`'s shape (each cell the better of the two scorers), ``scorer`` (which one won each
    cell), ``total`` and ``per_token`` (each scorer's table), ``ties`` (per scorer) and ``foils``."""
    g = pairs.head(gallery)
    texts, _, cap_pos = gallery_captions(g)
    kinds, totals, per_token = [], [], []
    ties = {"total": 0, "per_token": 0}
    cache: dict[str, tuple[float, int]] = {}

    def score(text: str) -> tuple[float, int]:
        if text not in cache:
            cache[text] = lm.logprob(text)
        return cache[text]

    for i, fs in enumerate(g.foils):
        for f in fs:
            if (i, f["caption_index"]) not in cap_pos:
                continue
            (lt, nt), (lf, nf) = score(texts[cap_pos[(i, f["caption_index"])]]), score(f["text"])
            kinds.append(foil_kind(g, i, f))
            totals.append(_outcome(lt, lf))
            per_token.append(_outcome(lt / nt, lf / nf))
            ties["total"] += lt == lf
            ties["per_token"] += lt / nt == lf / nf
    by_total = foil_accuracy_by_kind(kinds, totals)
    by_token = foil_accuracy_by_kind(kinds, per_token)
    best: dict = defaultdict(dict)
    scorer: dict = defaultdict(dict)
    for kind, parts in by_total.items():
        for part, cell in parts.items():
            other = by_token[kind][part]
            pick = "total" if cell["accuracy"] >= other["accuracy"] else "per_token"
            best[kind][part] = cell if pick == "total" else other
            scorer[kind][part] = pick
    return {"by_kind": dict(best), "scorer": dict(scorer), "total": by_total, "per_token": by_token,
            "ties": ties, "foils": len(kinds)}


def evaluate_text_baseline(pairs: Pairs, *, gallery: int = 1000, config: TextBaselineConfig | None = None,
                           lm: TrigramLM | None = None) -> dict:
    """Fit the training-caption language model (unless ``lm`` is given) and score the gallery's foils with
    it (:func:`text_only_foils`): the ``foil_text_only`` section of ``clipdex eval retrieval --json``, with
    the model's settings (``lm``) and the seconds it took."""
    config = config or TextBaselineConfig()
    start = time.perf_counter()
    if lm is None:
        lm = fit_training_lm(config=config)
    fitted = time.perf_counter()
    result = text_only_foils(lm, pairs, gallery=gallery)
    result["lm"] = {"order": 3, "smoothing": "interpolated Kneser-Ney", "discount": lm.discount, **lm.source,
                    "captions": lm.sentences, "vocabulary": len(lm.vocab)}
    result["seconds"] = {"fit": round(fitted - start, 2), "score": round(time.perf_counter() - fitted, 2)}
    return result
