"""``clipdex eval answer``: proof that retrieval is what answers, on landmarks the decoder never saw.

The evaluation world is generated with another seed than the decoder's training world and indexed with
clipdex; its landmark facts exist only in its corpus captions. For every query view (a new photo of a
landmark) the built-in decoder answers:

- the four fact questions with the top-k retrieved items (``rag``), with no items (``no_retrieval``),
  with k random corpus items (``random``), and with the right landmark's entry forced in (``oracle``:
  it replaces the last item when the retriever missed it);
- its visual questions (count, colour, position, relation), with and without retrieval;
- a caption (no question), with and without retrieved captions: BLEU-4 and CIDEr (pycocoevalcap) against
  the view's own captions.

``evidence_top1``: of the correctly answered fact questions, the share whose highest-weighted item is the
right landmark. ``retriever_recall@k``: the share of views whose top-k holds the right landmark. Answers are
compared exactly after :func:`~clipdex.retrieval.answer.prompt.normalise` (lower case, tokenizer spacing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipdex.retrieval.answer.decoder import FusedDecoder
from clipdex.retrieval.answer.generate import greedy
from clipdex.retrieval.answer.prompt import Prompt, decode_ids, encode_prompt, normalise
from clipdex.retrieval.evaluation.answer_world import (
    FACT_OF_KIND,
    VISUAL_KINDS,
    WorldData,
)

MODES = ("rag", "no_retrieval", "random", "oracle")


@dataclass
class Query:
    """One evaluation question: the view, the corpus positions given as items, and the gold answer."""

    view: int
    question: str | None
    gold: str | list[str]
    items: list[int]
    kind: str


def items_for(data: WorldData, view: int, *, mode: str, k: int, rng: np.random.Generator) -> list[int]:
    """Corpus positions given to the decoder for ``view`` under ``mode``."""
    top = [int(i) for i in data.view_neighbours[view][:k]]
    if mode == "no_retrieval" or k == 0:
        return []
    if mode == "random":
        return [int(i) for i in rng.choice(len(data.corpus_ids), size=k, replace=False)]
    if mode == "oracle" and data.view_landmark[view] not in top:
        top[-1] = data.view_landmark[view]
    return top


def prompt_of(data: WorldData, q: Query) -> Prompt:
    """The decoder's prompt for ``q`` (each item's first caption, as ``clipdex ask`` gives it)."""
    return Prompt(q.question, data.view_vectors[q.view],
                  [(data.corpus_vectors[i], data.corpus_captions[i][0]) for i in q.items])


def run_queries(model: FusedDecoder, data: WorldData, queries: list[Query], *, batch_size: int = 48,
                max_new_tokens: int = 16, device="cpu") -> list[tuple[str, list[float]]]:
    """Greedy answers (text, evidence weights) for ``queries``."""
    out = []
    for s in range(0, len(queries), batch_size):
        chunk = queries[s:s + batch_size]
        seqs = [encode_prompt(prompt_of(data, q), model.cfg) for q in chunk]
        out += [(decode_ids(d.ids), d.weights) for d in greedy(model, seqs, max_new_tokens=max_new_tokens,
                                                                device=device)]
    return out


def fact_queries(data: WorldData, views: list[int], *, mode: str, k: int, rng) -> list[Query]:
    """The four fact questions of each view."""
    return [Query(v, q["question"], data.corpus_facts[data.view_landmark[v]][FACT_OF_KIND[q["kind"]]],
                  items_for(data, v, mode=mode, k=k, rng=rng), q["kind"])
            for v in views for q in data.view_questions[v] if q["kind"] in FACT_OF_KIND]


def visual_queries(data: WorldData, views: list[int], *, k: int) -> list[Query]:
    """Each view's visual questions with its top-k items."""
    return [Query(v, q["question"], q["answer"], [int(i) for i in data.view_neighbours[v][:k]], q["kind"])
            for v in views for q in data.view_questions[v] if q["kind"] in VISUAL_KINDS]


def accuracy(answers: list[tuple[str, list[float]]], queries: list[Query]) -> float:
    """Exact-match accuracy after normalisation."""
    if not queries:
        return float("nan")
    return float(np.mean([normalise(a) == normalise(q.gold) for (a, _), q in zip(answers, queries)]))


def caption_scores(answers: list[tuple[str, list[float]]], refs: list[list[str]]) -> tuple[float, float]:
    """BLEU-4 and CIDEr (pycocoevalcap) of generated captions against references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {i: [normalise(a) or "empty"] for i, (a, _) in enumerate(answers)}
    gts = {i: [normalise(r) for r in rs] for i, rs in enumerate(refs)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return float(bleu[3]), float(cider)


def evaluate_answers(model: FusedDecoder, data: WorldData, *, views: list[int] | None = None, k: int = 5,
                     seed: int = 0, captions: bool = True, modes=MODES, device="cpu") -> dict:
    """The ``clipdex eval answer`` JSON for ``views`` (default: all query views)."""
    views = list(range(len(data.view_ids))) if views is None else views
    rng = np.random.default_rng(seed)
    out: dict = {"landmark": {}, "visual": {}, "k": k, "views": len(views)}
    rag_queries = rag_answers = None
    for mode in modes:
        qs = fact_queries(data, views, mode=mode, k=k, rng=rng)
        ans = run_queries(model, data, qs, device=device)
        out["landmark"][mode] = accuracy(ans, qs)
        if mode == "rag":
            rag_queries, rag_answers = qs, ans
    out["landmark"]["questions"] = len(rag_queries or [])
    hits = [q for q, (a, w) in zip(rag_queries or [], rag_answers or []) if normalise(a) == normalise(q.gold)]
    top1 = [q.items[int(np.argmax(w))] == data.view_landmark[q.view]
            for q, (a, w) in zip(rag_queries or [], rag_answers or [])
            if normalise(a) == normalise(q.gold) and w]
    out["evidence_top1"] = float(np.mean(top1)) if top1 else float("nan")
    out["evidence_top1_n"] = len(hits)
    out["retriever_recall@k"] = float(np.mean([data.view_landmark[v] in data.view_neighbours[v][:k]
                                               for v in views])) if views else float("nan")
    vq = visual_queries(data, views, k=k)
    out["visual"]["rag"] = accuracy(run_queries(model, data, vq, device=device), vq)
    vq0 = [Query(q.view, q.question, q.gold, [], q.kind) for q in vq]
    out["visual"]["no_retrieval"] = accuracy(run_queries(model, data, vq0, device=device), vq0)
    out["visual"]["questions"] = len(vq)
    if captions:
        refs = [data.view_captions[v] for v in views]
        cq = [Query(v, None, "", [int(i) for i in data.view_neighbours[v][:k]], "caption") for v in views]
        bleu, cider = caption_scores(run_queries(model, data, cq, max_new_tokens=48, device=device), refs)
        cq0 = [Query(v, None, "", [], "caption") for v in views]
        bleu0, cider0 = caption_scores(run_queries(model, data, cq0, max_new_tokens=48, device=device), refs)
        out["caption"] = {"bleu4": bleu, "cider": cider, "bleu4_no_retrieval": bleu0, "cider_no_retrieval": cider0}
    return out


def format_answer_table(r: dict) -> str:
    """The evaluation as a small text table."""
    lm, vis = r["landmark"], r["visual"]
    lines = [f"{'':28s}{'with retrieval':>16s}{'no retrieval':>14s}{'random items':>14s}{'oracle':>9s}",
             f"{'landmark facts (EM)':28s}{lm['rag']:16.3f}{lm['no_retrieval']:14.3f}{lm['random']:14.3f}"
             f"{lm['oracle']:9.3f}",
             f"{'visual questions (EM)':28s}{vis['rag']:16.3f}{vis['no_retrieval']:14.3f}"]
    if "caption" in r:
        c = r["caption"]
        lines += [f"{'captions BLEU-4':28s}{c['bleu4']:16.3f}{c['bleu4_no_retrieval']:14.3f}",
                  f"{'captions CIDEr':28s}{c['cider']:16.3f}{c['cider_no_retrieval']:14.3f}"]
    lines += [f"evidence top-1 = right landmark: {r['evidence_top1']:.3f} (of {r['evidence_top1_n']} correct answers)",
              f"retriever recall@{r['k']}: {r['retriever_recall@k']:.3f}   "
              f"({r['views']} query views, {lm['questions']} fact questions, {vis['questions']} visual questions)"]
    return "\n".join(lines)
