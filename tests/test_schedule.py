"""The shared schedule and weight-decay rule give each trainer exactly what it had before they were folded."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from clipdex.retrieval.answer.decoder import DecoderConfig, FusedDecoder
from clipdex.retrieval.training.schedule import (
    DECODER_NO_DECAY,
    ENCODER_NO_DECAY,
    cosine_lr,
    param_groups,
)


def _encoder_lr_before(step, *, base, warmup, total):  # training/contrastive.py before the fold
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * base * (1 + math.cos(math.pi * progress))


def _decoder_lr_before(step, *, base, warmup, total):  # training/decoder.py before the fold
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@pytest.mark.parametrize("base,warmup,total", [(5e-4, 200, 1000), (1e-3, 100, 2000), (3e-4, 1, 7)])
def test_both_schedules_are_unchanged_to_the_bit(base, warmup, total):
    for step in range(total + 5):
        assert cosine_lr(step, base=base, warmup=warmup, total=total) == \
            _encoder_lr_before(step, base=base, warmup=warmup, total=total)
        assert cosine_lr(step, base=base, warmup=warmup, total=total, final_fraction=0.1) == \
            _decoder_lr_before(step, base=base, warmup=warmup, total=total)


def test_schedule_shape():
    lr = [cosine_lr(s, base=1.0, warmup=10, total=110, final_fraction=0.1) for s in range(120)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == 1.0  # warm-up reaches the peak
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))  # then never rises
    assert lr[110] == pytest.approx(0.1) and lr[119] == pytest.approx(0.1)  # the floor, held


def test_decoder_groups_match_the_rule_it_had():
    model = FusedDecoder(DecoderConfig(d_model=32, n_layer=1, n_head=2, image_tokens=2, dropout=0.0, embed_dim=16))
    decay, exempt = param_groups(model, weight_decay=0.01, no_decay=DECODER_NO_DECAY)
    before = {n: p.dim() >= 2 and not n.startswith(("wpe", "wse", "wie")) for n, p in model.named_parameters()}
    named = dict(model.named_parameters())
    assert [id(p) for p in decay["params"]] == [id(named[n]) for n in before if before[n]]
    assert [id(p) for p in exempt["params"]] == [id(named[n]) for n in before if not before[n]]
    assert decay["weight_decay"] == 0.01 and exempt["weight_decay"] == 0.0
    assert any(p is named["wte.weight"] for p in decay["params"])  # the token table is decayed


def test_encoder_groups_exempt_scales_positions_and_frozen_parameters():
    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.positional_embedding = torch.nn.Parameter(torch.zeros(3, 4))
            self.logit_scale = torch.nn.Parameter(torch.zeros(()))
            self.frozen = torch.nn.Parameter(torch.zeros(4, 4), requires_grad=False)

    m = Tower()
    decay, exempt = param_groups(m, weight_decay=0.1, no_decay=ENCODER_NO_DECAY)
    assert [id(p) for p in decay["params"]] == [id(m.proj.weight)]
    assert {id(p) for p in exempt["params"]} == {id(m.proj.bias), id(m.positional_embedding), id(m.logit_scale)}


def _encoder_groups_before(model, weight_decay):  # training/contrastive.py's _param_groups before the fold
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "logit_scale" in name or "positional_embedding" in name or "class_embedding" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _ids(groups):
    return [([id(p) for p in g["params"]], g["weight_decay"]) for g in groups]


def test_real_models_get_the_groups_they_had():
    """The built dual encoder (clipdex-tiny, as the trainer builds it) and the decoder in the trainer's default
    shape: the same parameters, in the same order (AdamW's state is saved by position), with the same decay."""
    from clipdex.retrieval.models.encoder import build_model
    from clipdex.retrieval.training.decoder import DecoderTrainConfig

    encoder = build_model("clipdex-tiny:random").model
    new = param_groups(encoder, weight_decay=0.1, no_decay=ENCODER_NO_DECAY)
    assert _ids(new) == _ids(_encoder_groups_before(encoder, 0.1))
    exempt = {id(p) for p in new[1]["params"]}
    assert id(encoder.logit_scale) in exempt and id(encoder.positional_embedding) in exempt
    assert id(encoder.token_embedding.weight) not in exempt  # the token table is decayed

    decoder = FusedDecoder(replace(DecoderTrainConfig(out="unused").decoder, embed_dim=64))
    named = list(decoder.named_parameters())
    before = {n: p.dim() >= 2 and not n.startswith(("wpe", "wse", "wie")) for n, p in named}
    old = [{"params": [p for n, p in named if before[n]], "weight_decay": 0.01},
           {"params": [p for n, p in named if not before[n]], "weight_decay": 0.0}]
    assert _ids(param_groups(decoder, weight_decay=0.01, no_decay=DECODER_NO_DECAY)) == _ids(old)
