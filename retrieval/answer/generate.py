"""Decoding for the fused decoder: batched greedy search and beam search, each with evidence weights.

The context is a few hundred tokens, so each step simply re-runs the sequence (no key/value cache): a
step costs a few milliseconds on a CPU and the code stays short.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipdex.retrieval.answer.decoder import FusedDecoder
from clipdex.retrieval.answer.prompt import Sequence, add_answer, collate, eos_id


@dataclass
class Decoded:
    """One generated answer: its token ids and the evidence weight of each retrieved item (mean over its
    tokens of the share of the output mass that came from the item)."""

    ids: list[int]
    weights: list[float]
    logp: float = 0.0


def _n_items(seq: Sequence) -> int:
    return max(seq.items) if seq.items else 0


@torch.no_grad()
def greedy(model: FusedDecoder, prompts: list[Sequence], *, max_new_tokens: int = 32,
           device: str | torch.device = "cpu") -> list[Decoded]:
    """Greedy answers for a batch of prompt sequences (each ending with the start token)."""
    model.eval()
    cfg = model.cfg
    ids: list[list[int]] = [[] for _ in prompts]
    mass = [torch.zeros(cfg.max_items) for _ in prompts]
    logp = [0.0 for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        if not active:
            break
        seqs = [add_answer(prompts[i], ids[i], teacher_forcing=False) for i in active]
        b = collate(seqs, cfg).to(device)
        lp, out = model.next_token_logp(b, need_weights=True)
        best = lp.argmax(-1).tolist()
        step_mass = model.evidence_mass(b, out).cpu()
        still = []
        for row, i in enumerate(active):
            logp[i] += float(lp[row, best[row]])
            if best[row] == eos_id():
                continue
            ids[i].append(best[row])
            mass[i] += step_mass[row]
            if len(ids[i]) < max_new_tokens:
                still.append(i)
        active = still
    return [Decoded(ids[i], (mass[i] / max(1, len(ids[i])))[:_n_items(prompts[i])].tolist(), logp[i])
            for i in range(len(prompts))]


@torch.no_grad()
def beam_search(model: FusedDecoder, prompt: Sequence, *, beams: int = 4, max_new_tokens: int = 32,
                device: str | torch.device = "cpu", length_penalty: float = 1.0) -> Decoded:
    """The best of ``beams`` hypotheses by log-probability / length**length_penalty."""
    if beams <= 1:
        return greedy(model, [prompt], max_new_tokens=max_new_tokens, device=device)[0]
    model.eval()
    cfg = model.cfg
    live = [([], 0.0, torch.zeros(cfg.max_items))]  # (ids, logp, evidence mass sum)
    done: list[tuple[float, list[int], torch.Tensor, float]] = []
    for _ in range(max_new_tokens):
        seqs = [add_answer(prompt, h[0], teacher_forcing=False) for h in live]
        b = collate(seqs, cfg).to(device)
        lp, out = model.next_token_logp(b, need_weights=True)
        step_mass = model.evidence_mass(b, out).cpu()
        top_lp, top_id = lp.topk(beams, dim=-1)
        cands = []
        for r, (h_ids, h_lp, h_mass) in enumerate(live):
            for v, t in zip(top_lp[r].tolist(), top_id[r].tolist()):
                cands.append((h_lp + v, h_ids, t, h_mass, step_mass[r]))
        cands.sort(key=lambda c: -c[0])
        live = []
        for total, h_ids, t, h_mass, s_mass in cands:
            if t == eos_id():
                done.append((total / max(1, len(h_ids)) ** length_penalty, h_ids, h_mass, total))
            elif len(live) < beams:
                live.append((h_ids + [t], total, h_mass + s_mass))
            if len(live) >= beams and len(done) >= beams:
                break
        if not live or (len(done) >= beams and max(d[0] for d in done) >=
                        max(lv[1] / len(lv[0]) ** length_penalty for lv in live)):
            break
    if not done:
        done = [(lv[1] / len(lv[0]) ** length_penalty, lv[0], lv[2], lv[1]) for lv in live]
    _, best_ids, best_mass, total = max(done, key=lambda d: d[0])
    weights = (best_mass / max(1, len(best_ids)))[:_n_items(prompt)].tolist()
    return Decoded(best_ids, weights, total)
