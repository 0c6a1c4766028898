"""Grounded answering with a pretrained Hugging Face image-text-to-text model (SmolVLM, Idefics3, Qwen2-VL, ...).

:class:`HFAnswerBackend` implements :class:`~clipdex.retrieval.answer.backend.AnswerBackend` on top of
``transformers``: the retrieved images, each followed by its ``[rank] caption`` line, then the query image and
the question go into ONE user turn of the model's own chat template, and the model's greedy (or beam-search)
continuation is the answer.

Using it with real weights (needs internet once, or a folder you downloaded yourself)::

    pip install "clipdex[hf]"
    clipdex ask --backend hf:HuggingFaceTB/SmolVLM-256M-Instruct ...   # a hub id
    clipdex ask --backend hf:/models/Qwen2-VL-2B-Instruct ...          # a local folder

A backend spec is ``hf:<model id or folder>`` (:data:`HF_PREFIX` followed by anything ``from_pretrained``
accepts). Weights are fetched into the Hugging Face cache on first use; set ``HF_HUB_OFFLINE=1`` afterwards to
load strictly from the cache. From Python::

    backend = HFAnswerBackend("HuggingFaceTB/SmolVLM-256M-Instruct", device="auto")
    answer = backend.generate(question="Where is this?", image=pil_image, image_vector=None, items=items)

``GeneratedAnswer.weights`` is always None here: an external model gives no honest per-item measure of how much
the answer drew on each retrieved item (attention maps are not attributions), so none is claimed.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipdex.exceptions import ClipdexError, MissingDependencyError, ModelSpecError
from clipdex.retrieval.answer.backend import (
    AnswerBackend,
    GeneratedAnswer,
    RetrievedItem,
)
from clipdex.retrieval.models.device import resolve_device
from clipdex.retrieval.models.images import open_rgb

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
"""The prefix of a backend spec naming a Hugging Face model: ``hf:<model id or folder>``."""

CAPTION_INSTRUCTION = "Write a one-sentence caption of the last image."
"""The text of the prompt when ``question`` is None: caption the query image (the last image of the turn)."""

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def _import_transformers():
    """The ``transformers`` module, or MissingDependencyError saying what to install."""
    try:
        import transformers
    except ImportError as e:
        raise MissingDependencyError(
            'the hf answer backend needs transformers: pip install "clipdex[hf]"') from e
    return transformers


def _model_class(transformers):
    """``AutoModelForImageTextToText``, or ``AutoModelForVision2Seq`` on versions that predate it."""
    cls = getattr(transformers, "AutoModelForImageTextToText", None) or getattr(
        transformers, "AutoModelForVision2Seq", None)
    if cls is None:
        raise MissingDependencyError(
            f"transformers {transformers.__version__} has neither AutoModelForImageTextToText nor "
            'AutoModelForVision2Seq: pip install -U "clipdex[hf]"')
    return cls


def _dtype_kwarg(transformers) -> str:
    """The name of ``from_pretrained``'s dtype argument: ``dtype`` since 4.56, ``torch_dtype`` before."""
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on a CUDA device that supports it, else fp32; otherwise a name from ``_DTYPES``."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _looks_like_path(model: str) -> bool:
    """True when ``model`` can only be a folder (a hub id is ``name`` or ``org/name``)."""
    return (model.startswith((".", "/", "~")) or os.sep in model.replace("/", "", 1)
            or (os.altsep is not None and os.altsep in model) or Path(model).exists())


def _load_image(item: RetrievedItem) -> Image.Image | None:
    """The item's image as RGB, or None (with a warning) when it has no file or the file is unreadable."""
    if not item.path:
        logger.warning("retrieved item %s (rank %d) has no image file; left out of the prompt", item.id, item.rank)
        return None
    try:
        return open_rgb(item.path)  # the one decoder: the pixels the item was indexed from
    except ClipdexError as e:
        logger.warning("retrieved item %s (rank %d): cannot read %s (%s); left out of the prompt",
                       item.id, item.rank, item.path, e)
        return None


class HFAnswerBackend(AnswerBackend):
    """An :class:`AnswerBackend` over any pretrained image-text-to-text model with a chat template.

    ``model`` is a hub id (``HuggingFaceTB/SmolVLM-256M-Instruct``) or a local folder written by
    ``save_pretrained``. ``device``: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``, ``cuda:1``.
    ``dtype``: ``auto`` (bf16 on a GPU that supports it, fp32 otherwise), ``float32``, ``bfloat16``, ``float16``.
    """

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto") -> None:
        transformers = _import_transformers()
        self.model_id = model
        self.name = f"{HF_PREFIX}{model}"
        self.device = resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        if _looks_like_path(model) and not Path(model).expanduser().is_dir():
            raise ModelSpecError(
                f"hf model folder {model!r} does not exist or is not a folder (a hub id is 'org/name')")
        path = str(Path(model).expanduser()) if _looks_like_path(model) else model
        model_cls = _model_class(transformers)
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(path)
            self.model = model_cls.from_pretrained(path, **{_dtype_kwarg(transformers): self.dtype})
        except ImportError as e:  # e.g. a processor that needs a package transformers does not require
            raise MissingDependencyError(f"loading {model!r} needs a missing package: {e}") from e
        except Exception as e:  # from_pretrained raises OSError, ValueError, KeyError, ... for a bad model
            raise ModelSpecError(
                f"cannot load {model!r} as a Hugging Face image-text-to-text model: {type(e).__name__}: {e}") from e
        if getattr(self.processor, "chat_template", None) is None or not hasattr(self.processor, "image_processor"):
            raise ModelSpecError(f"{model!r} has no processor with a chat template and an image processor; "
                                 "use an instruction-tuned image-text-to-text model")
        self.model.to(self.device).eval()
        logger.info("loaded %s (%s) on %s as %s", model, type(self.model).__name__, self.device, self.dtype)

    def build_messages(self, *, question: str | None, image: Image.Image | None,
                       items: list[RetrievedItem]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """The one-turn chat (``messages``) and its images, in the order the ``{"type": "image"}`` parts appear.

        Retrieved items without a readable image file are left out (with a warning). ``question=None`` asks for a
        caption of the query image, so it needs ``image``.
        """
        if question is None and image is None:
            raise ValueError("question=None asks for a caption of the query image, but no image was given")
        content: list[dict[str, Any]] = []
        images: list[Image.Image] = []
        shown = [(item, img) for item in items if (img := _load_image(item)) is not None]
        if shown:
            content.append({"type": "text", "text": "Similar images from the collection, with their captions:\n"})
        for item, img in shown:
            caption = item.caption if item.caption is not None else "(no caption)"
            content += [{"type": "image"}, {"type": "text", "text": f"[{item.rank}] {caption}\n"}]
            images.append(img)
        if image is not None:
            content += [{"type": "text", "text": "Query image:\n"}, {"type": "image"}]
            images.append(image.convert("RGB"))
        content.append({"type": "text", "text": question if question is not None else CAPTION_INSTRUCTION})
        return [{"role": "user", "content": content}], images

    def build_inputs(self, *, question: str | None, image: Image.Image | None, items: list[RetrievedItem]):
        """The processor's output (a ``BatchFeature`` of CPU tensors: ``input_ids``, ``pixel_values``, ...)."""
        messages, images = self.build_messages(question=question, image=image, items=items)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        bos = getattr(self.processor.tokenizer, "bos_token", None)
        kwargs: dict[str, Any] = {"add_special_tokens": False} if bos and prompt.startswith(bos) else {}
        return self.processor(text=prompt, images=images or None, return_tensors="pt", **kwargs)

    def generate(self, *, question: str | None, image, image_vector: np.ndarray | None,
                 items: list[RetrievedItem], max_new_tokens: int = 32, beams: int = 1) -> GeneratedAnswer:
        """The model's answer from the retrieved evidence; ``image_vector`` is unused (the model sees pixels)."""
        inputs = self.build_inputs(question=question, image=image, items=items).to(self.device, dtype=self.dtype)
        if "token_type_ids" in inputs and "token_type_ids" not in inspect.signature(self.model.forward).parameters:
            del inputs["token_type_ids"]  # some tokenizers emit them; generate() refuses inputs the model ignores
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=beams, do_sample=False)
        # (1, T_prompt + T_new) for decoder-only models; encoder-decoder ones return only the new tokens
        new = out if self.model.config.is_encoder_decoder else out[:, inputs["input_ids"].shape[1]:]
        text = self.processor.batch_decode(new, skip_special_tokens=True)[0].strip()
        return GeneratedAnswer(text=text, weights=None)
