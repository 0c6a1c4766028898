"""Device and precision choice: CUDA when present, mixed precision (bf16 autocast) on GPU, fp32 on CPU."""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU falls back to cpu with a warning."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        logger.warning("device %s asked for but CUDA is not available; falling back to cpu", device)
        return torch.device("cpu")
    return dev


def autocast(device: torch.device, precision: str = "auto"):
    """A context manager for mixed precision: bf16 autocast on CUDA unless precision is 'fp32'."""
    if device.type == "cuda" and precision in ("auto", "bf16", "amp"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if device.type == "cuda" and precision == "fp16":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()
