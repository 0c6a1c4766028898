"""What a grounded-answering backend receives and returns: the retrieved items, and the answer with weights.

A backend turns (query image, question, retrieved items) into an answer. Two implement it: the built-in
fused decoder (:mod:`clipdex.retrieval.answer.decoder`, trained here) and Hugging Face image-text-to-text models
(:mod:`clipdex.retrieval.answer.hf`). Retrieval itself is done by :mod:`clipdex.retrieval.answer.answerer`, so every
backend answers from exactly the evidence that is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # the encoder module imports torch; a backend's interface does not need it
    from clipdex.retrieval.models.info import EncoderInfo


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


@dataclass(frozen=True)
class Evidence:
    """One retrieved item as an answer shows it: its retrieval ``score`` (cosine similarity to the query)
    and its ``weight``, the share of the answer drawn from it (None when the backend cannot measure it)."""

    rank: int
    id: str
    path: str | None
    caption: str | None
    score: float
    weight: float | None

    def as_dict(self) -> dict:
        """The JSON shape: rank, id, path, caption, score, weight."""
        return {"rank": self.rank, "id": self.id, "path": self.path, "caption": self.caption,
                "score": self.score, "weight": self.weight}


class AnswerBackend(Protocol):
    """Anything that answers a question (or, with ``question=None``, captions the image) from evidence.

    A backend class may subclass this protocol to inherit the default :meth:`check_encoder`."""

    name: str

    def check_encoder(self, info: "EncoderInfo") -> None:
        """Refuse a collection whose embeddings this backend cannot read (raise ModelMismatchError).
        The default accepts any: a backend that reads pixels, not embeddings, does not care."""

    def generate(self, *, question: str | None, image, image_vector: np.ndarray | None,
                 items: list[RetrievedItem], max_new_tokens: int = 32, beams: int = 1) -> GeneratedAnswer:
        """The answer for one query. ``image`` is a PIL image or None; ``image_vector`` its (D,) embedding."""
        ...
