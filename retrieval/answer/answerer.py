"""Retrieval-grounded answering (``clipdex ask``): retrieve from a collection, answer, show the evidence.

    from clipdex.retrieval.answer.answerer import AskSettings, Answerer
    answerer = Answerer.open(AskSettings(db="clipdex-data/db", collection="demo"))
    result = answerer.ask(image="photo.jpg", question="when was it built?")
    print(result.answer)                      # "1742"
    for e in result.evidence: print(e)        # Evidence: rank, id, path, caption, score, weight

The query image (or, with no image, the question) retrieves the top-k images of the collection with their
first caption; the query image, the question and those items go to a backend: the built-in fused decoder
(:mod:`clipdex.retrieval.answer.decoder`, default) or a Hugging Face image-text-to-text model (``hf:<model>``,
:mod:`clipdex.retrieval.answer.hf`). With no question the backend writes a caption for the image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipdex.exceptions import ClipdexError, ModelMismatchError
from clipdex.retrieval.answer.backend import (
    AnswerBackend,
    Evidence,
    GeneratedAnswer,
    RetrievedItem,
)
from clipdex.retrieval.answer.checkpoint import SHIPPED_DECODER, load_decoder
from clipdex.retrieval.answer.generate import beam_search
from clipdex.retrieval.answer.prompt import (
    Prompt,
    decode_ids,
    encode_prompt,
    restore_case,
)
from clipdex.retrieval.models.device import resolve_device
from clipdex.retrieval.models.images import open_rgb
from clipdex.retrieval.store.record import DEFAULT_COLLECTION, DEFAULT_DB, Database
from clipdex.retrieval.store.search import SearchCollection

logger = logging.getLogger(__name__)

BUILTIN = "builtin"


@dataclass(frozen=True)
class AskSettings:
    """What ``clipdex ask`` does.

    backend: ``builtin`` (the fused decoder in ``decoder``, default the shipped one) or ``hf:<model id or
    folder>``. k: retrieved items (0: answer from the query alone). beams: 1 is greedy decoding.
    """

    db: str = DEFAULT_DB
    collection: str = DEFAULT_COLLECTION
    k: int = 5
    backend: str = BUILTIN
    decoder: str | None = None
    beams: int = 1
    max_new_tokens: int = 32
    device: str = "auto"


@dataclass
class AnswerResult:
    """The answer and the evidence it rests on."""

    question: str | None
    answer: str
    evidence: list[Evidence]
    backend: str

    def as_dict(self) -> dict:
        """The JSON shape: question, answer, evidence [{rank, id, path, caption, score, weight}]."""
        return {"question": self.question, "answer": self.answer, "evidence": [e.as_dict() for e in self.evidence]}


class BuiltinBackend(AnswerBackend):
    """The built-in fused decoder as an :class:`AnswerBackend` (greedy or beam search, copy-aware)."""

    def __init__(self, path: str | Path | None = None, *, device: str = "auto"):
        self.device = resolve_device(device)
        self.path = Path(path) if path else SHIPPED_DECODER
        self.model, self.meta = load_decoder(self.path, device=self.device)
        self.name = f"builtin:{self.path.name}"

    def check_encoder(self, info) -> None:
        """Refuse a collection whose embeddings come from another encoder than the decoder was trained on."""
        want = self.meta["encoder"]
        if want.get("weights") and info.weights and want["weights"] != info.weights:
            raise ModelMismatchError(
                f"decoder {self.path} reads embeddings of {want['spec']} (weights {want['weights']}), but the "
                f"collection was indexed with {info.spec} (weights {info.weights}); index it with "
                f"{want['spec']} or train a decoder for it with `clipdex train-decoder --model {info.spec}`")
        if want.get("embed_dim") != info.embed_dim:
            raise ModelMismatchError(f"decoder {self.path} expects {want.get('embed_dim')}-d embeddings; the "
                                     f"collection has {info.embed_dim}-d ones ({info.spec})")

    def generate(self, *, question, image, image_vector, items, max_new_tokens=32, beams=1) -> GeneratedAnswer:
        """Answer with the fused decoder; weights are the evidence mass per item."""
        prompt = Prompt(question, image_vector, [(it.vector, it.caption) for it in items])
        seq = encode_prompt(prompt, self.model.cfg)
        used = max(seq.items) if seq.items else 0
        if used < len(items):
            logger.warning("only %d of %d retrieved items fit in the decoder's context", used, len(items))
        d = beam_search(self.model, seq, beams=beams, max_new_tokens=max_new_tokens, device=self.device)
        text = restore_case(decode_ids(d.ids), [it.caption for it in items if it.caption])
        weights = [float(w) for w in d.weights] + [0.0] * (len(items) - len(d.weights))
        return GeneratedAnswer(text, weights)


def make_backend(spec: str, *, decoder: str | None = None, device: str = "auto") -> AnswerBackend:
    """The backend named by ``spec``: ``builtin`` or ``hf:<model>``."""
    if spec == BUILTIN:
        return BuiltinBackend(decoder, device=device)
    if spec.startswith("hf:") and len(spec) > 3:
        from clipdex.retrieval.answer.hf import HFAnswerBackend

        return HFAnswerBackend(spec[3:], device=device)
    raise ClipdexError(f"unknown answer backend {spec!r}: use 'builtin' or 'hf:<model id or folder>' "
                       "(e.g. hf:HuggingFaceTB/SmolVLM-256M-Instruct)")


class Answerer:
    """A collection opened for grounded answering: search plus a backend."""

    def __init__(self, search, backend: AnswerBackend, *, settings: AskSettings = AskSettings()):
        self.search = search
        self.backend = backend
        self.settings = settings
        backend.check_encoder(search.info)

    @classmethod
    def open(cls, settings: AskSettings, *, encoder=None, backend: AnswerBackend | None = None) -> "Answerer":
        """Open ``settings.collection`` and load the backend (the encoder loads on the first query)."""
        search = SearchCollection(Database(settings.db).open(settings.collection), device=settings.device,
                                  encoder=encoder)
        backend = backend or make_backend(settings.backend, decoder=settings.decoder, device=settings.device)
        return cls(search, backend, settings=settings)

    def retrieve(self, *, image=None, question: str | None = None, k: int = 5):
        """(the query image as PIL or None, its embedding or None, the top-k items with captions and vectors)."""
        pil = vec = None
        if image is not None:
            pil = image if isinstance(image, Image.Image) else open_rgb(image)  # kept for backends that read pixels
            vec = self.search.embed_image(pil)
        if k <= 0:
            return pil, vec, []
        query = vec if vec is not None else self.search.embed_text(question)
        hits = self.search.search_vector(query, table="images", k=k, columns=("captions", "vector"))
        items = []
        for h in hits:
            r = h.extra or {}  # None: the row went between the FAISS index and now
            caps = r.get("captions") or []
            items.append(RetrievedItem(rank=h.rank, id=h.id, path=h.path, caption=caps[0] if caps else None,
                                       score=h.score, vector=np.asarray(r["vector"], np.float32) if r else None))
        return pil, vec, items

    def ask(self, *, image=None, question: str | None = None, k: int | None = None,
            beams: int | None = None) -> AnswerResult:
        """Answer ``question`` about ``image`` (a path or PIL image), or caption ``image`` when no question."""
        question = question.strip() if question else None
        if image is None and not question:
            raise ClipdexError("nothing to answer: give a question, an image (--image FILE), or both")
        if isinstance(image, (str, Path)) and not Path(image).is_file():
            raise ClipdexError(f"image not found: {image}")
        k = self.settings.k if k is None else k
        pil, vec, items = self.retrieve(image=image, question=question, k=k)
        out = self.backend.generate(question=question, image=pil, image_vector=vec, items=items,
                                    max_new_tokens=self.settings.max_new_tokens,
                                    beams=self.settings.beams if beams is None else beams)
        weights = out.weights if out.weights is not None else [None] * len(items)
        evidence = [Evidence(rank=it.rank, id=it.id, path=it.path, caption=it.caption, score=round(float(it.score), 4),
                             weight=None if w is None else round(float(w), 4)) for it, w in zip(items, weights)]
        return AnswerResult(question, out.text, evidence, self.backend.name)
