"""The fused decoder as a model (retrieval/answer/decoder.py), on a random tiny config: shapes, causality, the
attention fast path against the plain one, the loss on answer positions only, and how the copy gate, the copy
attention and the evidence weights add up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipdex.retrieval.answer.decoder import (
    IGNORE,
    SEG_ANSWER,
    Batch,
    DecoderConfig,
    FusedDecoder,
)
from clipdex.retrieval.answer.prompt import Prompt, add_answer, collate, encode_prompt, encode_text

CFG = DecoderConfig(d_model=32, n_layer=2, n_head=2, image_tokens=2, dropout=0.0, embed_dim=16, max_len=160)
CAPTION = "The Varn Gate, built in 1742 by Mira Talon"


def _vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=CFG.embed_dim).astype(np.float32)


def _seqs():
    """Two teacher-forced sequences of different lengths: a question with two items (one without an image), and
    a caption request with one item."""
    a = encode_prompt(Prompt("who built it?", _vec(0), [(_vec(1), CAPTION), (None, "a blue star")]), CFG)
    b = encode_prompt(Prompt(None, _vec(2), [(_vec(3), "a red circle")]), CFG)
    return [add_answer(a, encode_text("Mira Talon"), teacher_forcing=True),
            add_answer(b, encode_text("a red circle"), teacher_forcing=True)], [a, b]


def _batch() -> Batch:
    return collate(_seqs()[0], CFG)


def _with(b: Batch, **fields) -> Batch:
    return Batch(**{**b.__dict__, **fields})


@pytest.fixture(scope="module")
def model() -> FusedDecoder:
    torch.manual_seed(0)
    m = FusedDecoder(CFG).eval()
    with torch.no_grad():  # a gate away from its initial 0.5, so mixing errors would show
        m.gate.bias.fill_(0.7)
    return m


def _all_positions(b: Batch):
    rows, cols = torch.meshgrid(torch.arange(b.tokens.size(0)), torch.arange(b.tokens.size(1)), indexing="ij")
    keep = cols < b.lengths[:, None]
    return rows[keep], cols[keep]


@torch.no_grad()
def test_shapes(model):
    b = _batch()
    B, T = b.tokens.shape
    h, att = model.hidden(b)
    assert h.shape == (B, T, CFG.d_model) and att is None
    h, att = model.hidden(b, need_weights=True)
    assert att.shape == (B, T, T)
    rows, cols = (b.targets != IGNORE).nonzero(as_tuple=True)
    out = model.step_outputs(b, h, rows, cols, att)
    n = len(rows)
    assert out.vocab_logp.shape == (n, CFG.vocab_size) and out.copy_attn.shape == (n, T)
    assert out.gate.shape == (n,) and out.last_attn.shape == (n, T)
    logp, last = model.next_token_logp(b)
    assert logp.shape == (B, CFG.vocab_size) and last.copy_attn.shape == (B, T) and last.last_attn is None
    assert model(b).shape == ()


@torch.no_grad()
@pytest.mark.parametrize("where", ["caption", "answer"])
def test_a_later_token_changes_no_earlier_output(model, where):
    """Causal: changing the token at position j (a caption token, which the copy head may point at, or an
    answer token) leaves every output at positions before j as it was, hidden states and the mixed
    distribution's parts alike, on both attention paths; the output at j does change."""
    b = _batch()
    if where == "caption":
        j = int((b.copyable[0] & (b.items[0] == 1)).nonzero()[3])
    else:
        j = int(b.lengths[0]) - 3
    tokens = b.tokens.clone()
    tokens[0, j] = 1234
    other = _with(b, tokens=tokens)
    rows, cols = _all_positions(b)
    before = (rows == 0) & (cols < j)
    for need in (False, True):
        h, att = model.hidden(b, need_weights=need)
        h2, att2 = model.hidden(other, need_weights=need)
        assert torch.equal(h[1], h2[1])  # the other sequence of the batch is untouched
        torch.testing.assert_close(h[0, :j], h2[0, :j], atol=1e-6, rtol=0)
        assert not torch.allclose(h[0, j], h2[0, j])
        o = model.step_outputs(b, h, rows, cols, att)
        o2 = model.step_outputs(other, h2, rows, cols, att2)
        for name in ("vocab_logp", "copy_attn", "gate") + (("last_attn",) if need else ()):
            torch.testing.assert_close(getattr(o, name)[before], getattr(o2, name)[before], atol=1e-6, rtol=0)


@torch.no_grad()
def test_attention_fast_path_matches_the_plain_one(model):
    """The fused scaled-dot-product path (training, generation) and the explicit one that returns the attention
    map (evidence weights) compute the same hidden states; the map is causal and each row sums to 1."""
    b = _batch()
    fast, _ = model.hidden(b)
    plain, att = model.hidden(b, need_weights=True)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    T = b.tokens.size(1)
    assert not att[:, torch.ones(T, T, dtype=torch.bool).triu(1)].any()  # nothing attends to a later position
    torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:2]))


@torch.no_grad()
def test_loss_is_the_mean_nll_of_the_answer_positions_only(model):
    b = _batch()
    _, contexts = _seqs()
    answer = (b.targets != IGNORE)
    for r, ctx in enumerate(contexts):  # targets sit on the answer's start token and the answer, nowhere else
        n = int(b.lengths[r])
        assert answer[r].nonzero().squeeze(1).tolist() == list(range(len(ctx.tokens) - 1, n))
        assert (b.segments[r, len(ctx.tokens) - 1:n] == SEG_ANSWER).all()
    h, _ = model.hidden(b)
    rows, cols = answer.nonzero(as_tuple=True)
    out = model.step_outputs(b, h, rows, cols)
    reference = -model.log_prob_of(b, out, rows, b.targets[rows, cols]).mean()
    torch.testing.assert_close(model(b), reference)
    # a context position given a target of its own joins the loss: IGNORE is what keeps the context out
    stray = b.targets.clone()
    stray[0, 1] = 42
    assert not torch.allclose(model(_with(b, targets=stray)), reference)
    # the loss still depends on the context through attention
    changed = b.tokens.clone()
    changed[0, 5] = 999
    assert not torch.allclose(model(_with(b, tokens=changed)), reference)


@torch.no_grad()
def test_copy_gate_and_attention_make_one_distribution(model):
    b = _batch()
    logp, out = model.next_token_logp(b, need_weights=True)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2), atol=1e-4, rtol=0)
    assert ((out.gate > 0) & (out.gate < 1)).all()
    torch.testing.assert_close(out.copy_attn.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    last = b.lengths - 1
    for r in range(2):  # copy mass only on copyable context text before the current position
        mass = out.copy_attn[r]
        allowed = b.copyable[r].clone()
        allowed[int(last[r]):] = False
        assert (mass[~allowed] == 0).all() and (mass[allowed] > 0).all()
        assert (mass[b.image_slot[r] >= 0] == 0).all()
    # the mixture: what the vocabulary gives a token, plus the copy mass on every position holding it
    r, tok = 0, int(b.tokens[0, 3])
    want = out.gate[r] * out.vocab_logp[r, tok].exp() + (1 - out.gate[r]) * out.copy_attn[r][b.tokens[r] == tok].sum()
    torch.testing.assert_close(logp[r, tok].exp(), want, atol=1e-6, rtol=1e-4)


@torch.no_grad()
def test_evidence_mass_follows_the_gate(model):
    """Each item's weight is its share of the output mass: the copy mass on its tokens plus the vocabulary
    share times the last layer's attention on them. All of it comes from items or the question, so the item
    weights sum to at most 1, and no item that is not in the prompt gets any."""
    b = _batch()
    _, out = model.next_token_logp(b, need_weights=True)
    mass = model.evidence_mass(b, out)
    assert mass.shape == (2, CFG.max_items) and (mass >= 0).all() and (mass.sum(-1) <= 1 + 1e-5).all()
    assert (mass[0, 2:] == 0).all() and (mass[1, 1:] == 0).all()  # 2 items, then 1 item
    for r in range(2):
        on_items = (b.items[r] > 0)
        expected = ((1 - out.gate[r]) * out.copy_attn[r] + out.gate[r] * out.last_attn[r])[on_items].sum()
        torch.testing.assert_close(mass[r].sum(), expected, atol=1e-6, rtol=1e-5)
    copy_only = model.evidence_mass(b, type(out)(out.vocab_logp, out.copy_attn, torch.zeros(2), None))
    for r in range(2):  # gate 0: the weights are exactly the copy attention on each item's tokens
        for i in range(CFG.max_items):
            torch.testing.assert_close(copy_only[r, i], out.copy_attn[r][b.items[r] == i + 1].sum())


@torch.no_grad()
def test_nothing_to_copy_means_vocabulary_only(model):
    """A position with no copyable token before it (the first one) takes its distribution from the vocabulary
    alone, whatever the gate's weights say."""
    b = _batch()
    h, _ = model.hidden(b)
    rows, cols = torch.tensor([0, 1]), torch.tensor([0, 0])
    out = model.step_outputs(b, h, rows, cols)
    assert (out.gate == 1).all() and (out.copy_attn == 0).all()
