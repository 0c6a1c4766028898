"""Turning a query and its retrieved items into the fused decoder's token sequence, and answers back into text.

The tokenizer is open_clip's BPE tokenizer (lower-cases; digits are single tokens), so the decoder shares
its vocabulary with the dual encoder's text tower. Layout and segment ids are described in
:mod:`clipdex.retrieval.answer.decoder`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from clipdex.retrieval.answer.decoder import (
    IGNORE,
    SEG_ANSWER,
    SEG_ITEM_IMAGE,
    SEG_ITEM_TEXT,
    SEG_QUERY_IMAGE,
    SEG_QUESTION,
    Batch,
    DecoderConfig,
)

MAX_CAPTION_TOKENS = 48  # a retrieved caption is cut to this many tokens (landmark facts come first)
MAX_QUESTION_TOKENS = 24
MAX_ANSWER_TOKENS = 48  # room kept at the end of every sequence for the answer
CAPTION_PROMPT = "caption:"


@functools.lru_cache(maxsize=1)
def tokenizer():
    """open_clip's BPE tokenizer (one instance)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def bos_id() -> int:
    """The start token, used as the answer's first input."""
    return tokenizer().sot_token_id


def eos_id() -> int:
    """The end token, the answer's last target."""
    return tokenizer().eot_token_id


def encode_text(text: str) -> list[int]:
    """BPE ids of ``text`` (no start/end tokens)."""
    return tokenizer().encode(text)


def decode_ids(ids: list[int]) -> str:
    """Readable text from ids: digits joined back into numbers, no space before punctuation."""
    text = tokenizer().decode([i for i in ids if i not in (bos_id(), eos_id())]).strip()
    text = re.sub(r"(?<=\d) (?=\d)", "", text)
    return re.sub(r" ([,.:;?!)])", r"\1", text).replace("( ", "(")


def normalise(text: str) -> str:
    """The form answers are compared in (exact match): the tokenizer's lower-cased, spaced form."""
    return decode_ids(encode_text(text)).lower()


def restore_case(answer: str, sources: list[str]) -> str:
    """``answer`` as it is written in the first of ``sources`` that contains it (copied facts keep their
    capitals: "the Varn Gate"); unchanged when no source has it."""
    pieces = [p for p in re.split(r"\s+", answer) if p]
    if not pieces:
        return answer
    pattern = re.compile(r"(?<!\w)" + r"\s*".join(
        r"\s*".join(re.escape(c) for c in p) if p.isdigit() else re.escape(p) for p in pieces) + r"(?!\w)",
        re.IGNORECASE)
    for s in sources:
        m = pattern.search(s or "")
        if m:
            return m.group(0)
    return answer


@dataclass
class Prompt:
    """What the decoder reads: the query image's embedding, the question (None: write a caption) and the
    retrieved items as (image embedding or None, caption or None)."""

    question: str | None
    image: np.ndarray | None
    items: list[tuple[np.ndarray | None, str | None]] = field(default_factory=list)


@dataclass
class Sequence:
    """One sequence as lists (see :class:`~clipdex.retrieval.answer.decoder.Batch` for the fields)."""

    tokens: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    items: list[int] = field(default_factory=list)
    image_slot: list[int] = field(default_factory=list)
    copyable: list[bool] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    sims: list[float] = field(default_factory=list)

    def add(self, ids, *, segment: int, item: int = 0, copyable: bool = False, sim: float = 0.0) -> None:
        """Append text tokens."""
        n = len(ids)
        self.sims += [sim] * n
        self.tokens += list(ids)
        self.segments += [segment] * n
        self.items += [item] * n
        self.image_slot += [-1] * n
        self.copyable += [copyable] * n
        self.targets += [IGNORE] * n

    def add_image(self, vector: np.ndarray, *, m: int, segment: int, item: int = 0, sim: float = 0.0) -> None:
        """Append one image as ``m`` visual tokens."""
        base = len(self.images) * m
        self.sims += [sim] * m
        self.images.append(np.asarray(vector, dtype=np.float32))
        self.tokens += [0] * m
        self.segments += [segment] * m
        self.items += [item] * m
        self.image_slot += list(range(base, base + m))
        self.copyable += [False] * m
        self.targets += [IGNORE] * m

    def copy(self) -> "Sequence":
        """A copy that can be extended independently."""
        return Sequence(*(list(getattr(self, f)) for f in ("tokens", "segments", "items", "image_slot",
                                                            "copyable", "targets", "images", "sims")))


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def encode_prompt(prompt: Prompt, cfg: DecoderConfig) -> Sequence:
    """The context sequence of ``prompt``, ending with the answer's start token. Items that do not fit in
    ``cfg.max_len`` (keeping room for the answer) are left out, from the last."""
    seq = Sequence()
    if prompt.image is not None:
        seq.add_image(prompt.image, m=cfg.image_tokens, segment=SEG_QUERY_IMAGE)
    q = CAPTION_PROMPT if prompt.question is None else f"question: {prompt.question}"
    seq.add(encode_text(q)[:MAX_QUESTION_TOKENS], segment=SEG_QUESTION, copyable=True)
    budget = cfg.max_len - MAX_ANSWER_TOKENS - 1
    query = None if prompt.image is None else _unit(prompt.image)
    for i, (vec, caption) in enumerate(prompt.items[:cfg.max_items]):
        ids = encode_text(caption)[:MAX_CAPTION_TOKENS] if caption else []
        sim = float(query @ _unit(vec)) if query is not None and vec is not None else 0.0
        need = (cfg.image_tokens if vec is not None else 0) + len(ids) + 1
        if len(seq.tokens) + need > budget:
            break
        if vec is not None:
            seq.add_image(vec, m=cfg.image_tokens, segment=SEG_ITEM_IMAGE, item=i + 1, sim=sim)
        seq.add(ids + [eos_id()], segment=SEG_ITEM_TEXT, item=i + 1, copyable=True, sim=sim)
    seq.add([bos_id()], segment=SEG_ANSWER)
    return seq


def add_answer(seq: Sequence, answer_ids: list[int], *, teacher_forcing: bool) -> Sequence:
    """``seq`` extended by answer tokens. With ``teacher_forcing`` the targets are set (each position
    predicts the next answer token, the last predicts the end token)."""
    out = seq.copy()
    ids = list(answer_ids)[:MAX_ANSWER_TOKENS - 1]
    if teacher_forcing:
        out.targets[-1] = ids[0] if ids else eos_id()
    out.add(ids, segment=SEG_ANSWER)
    if teacher_forcing:
        n = len(out.targets)
        for j, t in enumerate(ids[1:] + [eos_id()]):
            out.targets[n - len(ids) + j] = t
    return out


def collate(seqs: list[Sequence], cfg: DecoderConfig) -> Batch:
    """Pad sequences (on the right) into one :class:`Batch`."""
    B, T = len(seqs), max(len(s.tokens) for s in seqs)
    I = max(1, max(len(s.images) for s in seqs))

    def pad(name: str, value, dtype):
        out = torch.full((B, T), value, dtype=dtype)
        for r, s in enumerate(seqs):
            out[r, :len(s.tokens)] = torch.tensor(getattr(s, name), dtype=dtype)
        return out

    images = torch.zeros(B, I, cfg.embed_dim)
    for r, s in enumerate(seqs):
        if s.images:
            images[r, :len(s.images)] = torch.from_numpy(np.stack(s.images))
    return Batch(tokens=pad("tokens", 0, torch.long), segments=pad("segments", SEG_ANSWER, torch.long),
                 items=pad("items", 0, torch.long), image_slot=pad("image_slot", -1, torch.long), images=images,
                 copyable=pad("copyable", False, torch.bool), targets=pad("targets", IGNORE, torch.long),
                 lengths=torch.tensor([len(s.tokens) for s in seqs]), item_sim=pad("sims", 0.0, torch.float32))
