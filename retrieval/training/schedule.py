"""What both trainers share: one learning-rate schedule and one weight-decay rule.

As open_clip's ``scheduler.py`` and nanoGPT's ``configure_optimizers``: a linear warm-up then a cosine
decay to a floor (the encoder's contrastive run decays to 0, the answering decoder's to 10%), and AdamW
parameter groups in which biases, norms and embeddings that are positions or single vectors get no
weight decay.
"""

from __future__ import annotations

import math

import torch

# Parameters of open_clip's towers that are not decayed besides those under 2 dimensions.
ENCODER_NO_DECAY = ("logit_scale", "positional_embedding", "class_embedding")
# The fused decoder's position, segment and item embeddings (its token embedding ``wte`` is decayed).
DECODER_NO_DECAY = ("wpe.", "wse.", "wie.")


def cosine_lr(step: int, *, base: float, warmup: int, total: int, final_fraction: float = 0.0) -> float:
    """The learning rate at ``step``: linear warm-up to ``base`` over ``warmup`` steps, then cosine decay
    to ``final_fraction * base`` at ``total`` (and held there after it)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``optimizer`` the learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def param_groups(model: torch.nn.Module, *, weight_decay: float, no_decay: tuple[str, ...]) -> list[dict]:
    """AdamW groups: trainable parameters of 2+ dimensions whose name contains none of ``no_decay`` get
    ``weight_decay``; the rest (biases, norm gains, the listed embeddings and scales) get none."""
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(part in name for part in no_decay)
        (exempt if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]
