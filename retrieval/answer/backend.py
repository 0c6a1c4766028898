"""What a grounded-answering backend receives and returns: the retrieved items, and the answer with weights.

A backend turns (query image, question, retrieved items) into an answer. Two implement it: the built-in
fused decoder (:mod:`clipdex.retrieval.answer.decoder`, trained here) and Hugging Face image-text-to-text models
(:mod:`clipdex.retrieval.answer.hf`). Retrieval itself is done by :mod:`clipdex.retrieval.answer.answerer`, so every
backend answers from exactly the evidence that is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class RetrievedItem:
    """One retrieved image of the collection, with the caption that goes into the prompt."""

    rank: int  # 1-based rank in the retrieval
    id: str
    path: str | None  # the image file (None when the collection has no file for it)
    caption: str | None  # None when the image has no caption in the collection
    score: float  # cosine similarity to the query
    vector: np.ndarray | None = None  # (D,) its image embedding, as stored in the collection


@dataclass(frozen=True)
class GeneratedAnswer:
    """A backend's answer; ``weights[i]`` is how much the answer drew on ``items[i]`` (None: not measurable)."""

    text: str
    weights: list[float] | None = None


class AnswerBackend(Protocol):
    """Anything that answers a question (or, with ``question=None``, captions the image) from evidence."""

    name: str

    def generate(self, *, question: str | None, image, image_vector: np.ndarray | None,
                 items: list[RetrievedItem], max_new_tokens: int = 32, beams: int = 1) -> GeneratedAnswer:
        """The answer for one query. ``image`` is a PIL image or None; ``image_vector`` its (D,) embedding."""
        ...
