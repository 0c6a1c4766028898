"""Fused-decoder checkpoints: safetensors weights plus the config, the encoder they read, and records.

Metadata keys: ``clipdex_format``, ``kind`` = "decoder", ``decoder_config`` (JSON of
:class:`~clipdex.retrieval.answer.decoder.DecoderConfig`), ``encoder`` (JSON: the dual encoder's spec, embedding
size and weights fingerprint, whose image embeddings the decoder was trained on) and ``records`` (training
and held-out metrics). The shipped decoder is stored in fp16 with only the token-embedding rows that
training saw (as the shipped encoder is, see :mod:`clipdex.retrieval.models.checkpoint`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clipdex.exceptions import CheckpointError
from clipdex.files import atomic_write
from clipdex.retrieval.answer.decoder import DecoderConfig, FusedDecoder
from clipdex.retrieval.models.checkpoint import (
    FORMAT_VERSION,
    compact_rows,
    expand_rows,
)
from clipdex.retrieval.models.registry import WEIGHTS_DIR

SHIPPED_DECODER = WEIGHTS_DIR / "clipdex-answer.safetensors"


def save_decoder(path: Path, model: FusedDecoder, *, encoder: dict, records: dict | None = None,
                 compact_token_ids: list[int] | None = None, half: bool = False) -> None:
    """Write the decoder to ``path`` atomically (see the module docstring for the metadata)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    if compact_token_ids is not None:
        tensors = compact_rows(tensors, key="wte.weight", ids=compact_token_ids)
    meta = {"clipdex_format": FORMAT_VERSION, "kind": "decoder",
            "decoder_config": json.dumps(model.cfg.as_dict(), sort_keys=True),
            "encoder": json.dumps(encoder, sort_keys=True), "records": json.dumps(records or {}, sort_keys=True)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_decoder_meta(path: Path) -> dict:
    """The metadata of a decoder checkpoint (config, encoder, records), parsed; raises CheckpointError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"decoder checkpoint not found: {path} (train one with `clipdex train-decoder`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); is it truncated?") from e
    if meta.get("kind") != "decoder":
        raise CheckpointError(f"{path}: not a clipdex decoder checkpoint (no decoder metadata); "
                              "an encoder checkpoint goes to --model, a decoder to --decoder")
    return {"config": json.loads(meta["decoder_config"]), "encoder": json.loads(meta["encoder"]),
            "records": json.loads(meta.get("records", "{}"))}


def load_decoder(path: Path | None = None, *, device: str | torch.device = "cpu") -> tuple[FusedDecoder, dict]:
    """The decoder stored at ``path`` (default: the shipped one) in eval mode, and its metadata."""
    from safetensors.torch import load_file

    path = Path(path) if path else SHIPPED_DECODER
    meta = read_decoder_meta(path)
    model = FusedDecoder(DecoderConfig(**meta["config"]))
    tensors = expand_rows(load_file(str(path)), key="wte.weight")
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit its own decoder config ({e})") from e
    return model.to(device).eval(), meta
