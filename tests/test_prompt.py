"""The prompt: what a query and its items become as a token sequence, and what is cut to fit."""

from __future__ import annotations

import numpy as np

from clipdex.retrieval.answer.decoder import (
    IGNORE,
    SEG_ANSWER,
    SEG_ITEM_IMAGE,
    SEG_ITEM_TEXT,
    SEG_QUERY_IMAGE,
    SEG_QUESTION,
    DecoderConfig,
)
from clipdex.retrieval.answer.prompt import (
    MAX_ANSWER_TOKENS,
    MAX_CAPTION_TOKENS,
    MAX_QUESTION_TOKENS,
    Prompt,
    add_answer,
    bos_id,
    collate,
    encode_prompt,
    encode_text,
    eos_id,
)

CFG = DecoderConfig(d_model=32, n_layer=1, n_head=2, image_tokens=2, dropout=0.0, embed_dim=8, max_len=160)
VEC = np.ones(CFG.embed_dim, np.float32)
LONG = " ".join(["red circle"] * 60)


def test_layout_segments_items_and_image_slots_in_order():
    """[query image: M slots] [question] ([item image: M slots] [caption + end]) per item [answer start]."""
    m = CFG.image_tokens
    q_ids, cap1, cap2 = encode_text("question: who built it?"), encode_text("by Mira Talon"), encode_text("a star")
    close = np.ones(CFG.embed_dim, np.float32)
    far = -close
    seq = encode_prompt(Prompt("who built it?", VEC, [(close, "by Mira Talon"), (far, "a star"), (None, "x y")]), CFG)
    n3 = len(encode_text("x y")) + 1
    segs = ([SEG_QUERY_IMAGE] * m + [SEG_QUESTION] * len(q_ids) + [SEG_ITEM_IMAGE] * m
            + [SEG_ITEM_TEXT] * (len(cap1) + 1) + [SEG_ITEM_IMAGE] * m + [SEG_ITEM_TEXT] * (len(cap2) + 1)
            + [SEG_ITEM_TEXT] * n3 + [SEG_ANSWER])
    assert seq.segments == segs
    items = [0] * (m + len(q_ids)) + [1] * (m + len(cap1) + 1) + [2] * (m + len(cap2) + 1) + [3] * n3 + [0]
    assert seq.items == items
    # text tokens in place; image slots hold token 0 and number the visual tokens of each image in turn
    assert seq.tokens[m:m + len(q_ids)] == q_ids and seq.tokens[-1] == bos_id()
    first = 2 * m + len(q_ids)  # item 1's caption, after its image; each caption ends with the end token
    assert seq.tokens[first:first + len(cap1) + 1] == cap1 + [eos_id()]
    slots = [s for s in seq.image_slot if s >= 0]
    assert slots == list(range(3 * m)) and len(seq.images) == 3  # query image, items 1 and 2
    assert all(t == 0 for t, s in zip(seq.tokens, seq.image_slot) if s >= 0)
    assert [s >= 0 for s in seq.image_slot] == [g in (SEG_QUERY_IMAGE, SEG_ITEM_IMAGE) for g in segs]
    # only the question and the captions may be copied
    text = [g in (SEG_QUESTION, SEG_ITEM_TEXT) for g in segs]
    assert seq.copyable == text
    # each item's tokens carry its image's cosine similarity to the query image (none without an image)
    sim = {i: {round(x, 5) for x, it in zip(seq.sims, seq.items) if it == i} for i in (0, 1, 2, 3)}
    assert sim == {0: {0.0}, 1: {1.0}, 2: {-1.0}, 3: {0.0}}
    assert all(t == IGNORE for t in seq.targets)  # a context alone predicts nothing


def test_at_most_max_items_are_read():
    seq = encode_prompt(Prompt("what?", None, [(None, f"item {i}") for i in range(CFG.max_items + 3)]), CFG)
    assert max(seq.items) == CFG.max_items and seq.images == []


def test_long_question_and_caption_are_cut_and_the_answer_slot_ends_the_context():
    seq = encode_prompt(Prompt(LONG, VEC, [(None, LONG)]), CFG)
    segments = np.asarray(seq.segments)
    assert (segments == SEG_QUESTION).sum() == MAX_QUESTION_TOKENS
    assert (segments == SEG_ITEM_TEXT).sum() == MAX_CAPTION_TOKENS + 1  # the caption, then its end token
    assert seq.tokens[-1] == bos_id() and seq.segments[-1] == SEG_ANSWER


def test_items_that_do_not_fit_are_left_out_from_the_last():
    items = [(VEC, f"item {i} " + LONG) for i in range(6)]
    seq = encode_prompt(Prompt("what?", VEC, items), CFG)
    kept = sorted(set(seq.items) - {0})
    assert kept == list(range(1, len(kept) + 1)) and 1 <= len(kept) < 6  # a prefix of the items
    assert len(seq.tokens) + MAX_ANSWER_TOKENS <= CFG.max_len  # room kept for the answer


def test_no_question_asks_for_a_caption_and_items_without_images_take_no_slots():
    seq = encode_prompt(Prompt(None, None, [(None, "a blue star")]), CFG)
    assert seq.tokens[: len(encode_text("caption:"))] == encode_text("caption:")
    assert all(s < 0 for s in seq.image_slot) and seq.images == []


def test_answer_targets_and_collate_padding():
    seq = encode_prompt(Prompt("who?", VEC, [(VEC, "by Mira Talon")]), CFG)
    long_answer = encode_text(LONG)
    full = add_answer(seq, long_answer, teacher_forcing=True)
    kept = MAX_ANSWER_TOKENS - 1
    assert len(full.tokens) == len(seq.tokens) + kept  # the answer is cut to fit its slot
    assert [t for t in full.targets if t != IGNORE] == long_answer[:kept] + [eos_id()]
    probe = add_answer(seq, long_answer[:2], teacher_forcing=False)
    assert all(t == IGNORE for t in probe.targets)  # generation: no targets
    b = collate([full, seq], CFG)
    n = len(seq.tokens)
    assert b.tokens.shape == (2, len(full.tokens)) and b.lengths.tolist() == [len(full.tokens), n]
    assert (b.tokens[1, n:] == 0).all() and (b.targets[1, n:] == IGNORE).all() and (b.image_slot[1, n:] == -1).all()
    assert not b.copyable[1, n:].any() and b.images.shape == (2, 2, CFG.embed_dim)
