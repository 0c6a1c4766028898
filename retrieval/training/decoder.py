"""``clipdex train-decoder``: train the fused decoder on a built-in world, retrieval through clipdex's index.

Steps: generate the training world (its own seed) and index its corpus with clipdex; retrieve every
query's neighbours through the collection's FAISS index (leave-one-out); then train on sequences drawn by
:class:`~clipdex.retrieval.training.decoder_data.ExampleSampler` (counterfactual facts, distractor landmarks,
context dropout, k items sampled from the top-N). A tenth of the landmarks (all their views) and 200
corpus images are held out; every "epoch" (``eval_every`` steps) reports held-out fact and visual accuracy
with the true top-k retrieval. ``<out>`` is written after every epoch, with ``<out>.state.pt`` (optimizer,
step, sampler RNG) beside it: a rerun with the same ``--out`` resumes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from clipdex.files import atomic_write
from clipdex.retrieval.answer.checkpoint import save_decoder
from clipdex.retrieval.answer.decoder import (
    DecoderConfig,
    FusedDecoder,
    count_parameters,
)
from clipdex.retrieval.answer.prompt import collate
from clipdex.retrieval.evaluation.answer_world import prepare_world
from clipdex.retrieval.evaluation.answers import evaluate_answers
from clipdex.retrieval.models.device import resolve_device
from clipdex.retrieval.models.encoder import load_encoder
from clipdex.retrieval.training.decoder_data import ExampleSampler, SamplerConfig
from clipdex.retrieval.training.schedule import (
    DECODER_NO_DECAY,
    cosine_lr,
    param_groups,
    set_lr,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorldSettings:
    """The training world: generated into ``world_dir`` with ``seed``, its corpus indexed into ``db``."""

    world_dir: str = "clipdex-data/decoder-world"
    db: str | None = None  # default: <world_dir>/db
    collection: str = "decoder-train"
    seed: int = 1  # the encoder was trained on seed 0, the demo uses 20261124, the evaluation 424242
    corpus: int = 3000
    landmarks: int = 300
    views: int = 3
    top_n: int = 10


@dataclass(frozen=True)
class DecoderTrainConfig:
    """One decoder training run. ``clipdex train-decoder`` sets most fields from its flags; ``warmup``,
    ``weight_decay``, ``heldout_landmarks`` and ``seed`` only the Python API sets."""

    out: str
    model: str = "clipdex-world"  # the dual encoder whose embeddings the decoder reads
    world: WorldSettings = field(default_factory=WorldSettings)
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(d_model=128, image_tokens=2, dropout=0.0))
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    eval_every: int = 250
    heldout_landmarks: float = 0.1
    seed: int = 0
    device: str = "auto"
    ship: bool = False  # also write <out> in the shipped form (fp16, trained token rows only)
    command: str = ""


def _heldout(n_views: int, view_landmark: list[int], frac: float, rng) -> set[int]:
    lms = sorted(set(view_landmark))
    held = set(rng.choice(lms, size=max(1, int(round(frac * len(lms)))), replace=False).tolist()) if lms else set()
    return {v for v in range(n_views) if view_landmark[v] in held}


@dataclass
class _Progress:
    """What a resume restores besides the weights and the optimizer."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    seen: set[int] = field(default_factory=set)  # token ids training has used (the shipped export keeps these)


def _sampler(cfg: DecoderTrainConfig, data, dcfg: DecoderConfig) -> tuple[ExampleSampler, list[int]]:
    """The training sampler, with a tenth of the landmarks (all their views) and 200 corpus images held out;
    returns it and the held-out views."""
    split_rng = np.random.default_rng([cfg.seed, 1])
    held_views = _heldout(len(data.view_ids), data.view_landmark, cfg.heldout_landmarks, split_rng)
    held_corpus = set(split_rng.choice(len(data.corpus_ids), size=min(200, len(data.corpus_ids) // 5),
                                       replace=False).tolist())
    sampler = ExampleSampler(data, dcfg, cfg.sampler, rng=np.random.default_rng([cfg.seed, 2]),
                             heldout_views=held_views, heldout_corpus=held_corpus)
    return sampler, sorted(held_views)


def _resume(state_path: Path, out: Path, cfg: DecoderTrainConfig, *, model, opt, sampler) -> _Progress:
    """Restore a run from ``state_path`` when it was written by the same configuration."""
    if not (state_path.exists() and out.exists()):
        return _Progress()
    st = torch.load(state_path, map_location="cpu", weights_only=False)
    if st["config"] != asdict(cfg) | {"command": st["config"].get("command")}:
        logger.warning("%s was written by another configuration; starting afresh", state_path)
        return _Progress()
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    sampler.rng.bit_generator.state = st["rng"]
    logger.info("resuming %s at step %d", out, st["step"])
    return _Progress(st["step"], st["history"], st["seconds"], set(st["seen"]))


def _train_step(model, opt, sampler: ExampleSampler, cfg: DecoderTrainConfig, dcfg: DecoderConfig, device,
                progress: _Progress) -> float:
    """One optimizer step on a freshly sampled batch; returns its loss."""
    seqs = sampler.batch(cfg.batch_size)
    for s in seqs:
        progress.seen.update(s.tokens)
    b = collate(seqs, dcfg).to(device)
    set_lr(opt, cosine_lr(progress.step, base=cfg.lr, warmup=cfg.warmup, total=cfg.steps, final_fraction=0.1))
    loss = model(b)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def _heldout_entry(model, data, held_views: list[int], cfg: DecoderTrainConfig, device, progress: _Progress,
                   losses: list[float]) -> dict:
    """The history row of an epoch's end: mean loss, and held-out fact and visual accuracy."""
    ev = evaluate_answers(model, data, views=held_views, k=cfg.sampler.k, captions=False,
                          modes=("rag", "no_retrieval"), device=device) if held_views else {}
    entry = {"step": progress.step, "loss": round(float(np.mean(losses[-cfg.eval_every:])), 4),
             "seconds": round(progress.seconds, 1)}
    if ev:
        entry |= {"heldout_landmark_rag": ev["landmark"]["rag"],
                  "heldout_landmark_no_retrieval": ev["landmark"]["no_retrieval"],
                  "heldout_visual_rag": ev["visual"]["rag"], "heldout_evidence_top1": ev["evidence_top1"]}
    return entry


def train_decoder(cfg: DecoderTrainConfig, *, progress: bool = True, resume: bool = True, encoder=None) -> dict:
    """Run (or resume) decoder training; returns the record (also in the checkpoint and ``<out>.json``)."""
    from tqdm.auto import tqdm

    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    w = cfg.world
    enc = encoder or load_encoder(cfg.model, device=str(device))
    t0 = time.time()
    data = prepare_world(world_dir=w.world_dir, db=w.db or str(Path(w.world_dir) / "db"), collection=w.collection,
                         model=cfg.model, seed=w.seed, corpus=w.corpus, landmarks=w.landmarks, views=w.views,
                         top_n=w.top_n, progress=progress, encoder=enc)
    prep_s = time.time() - t0
    dcfg = replace(cfg.decoder, embed_dim=int(data.corpus_vectors.shape[1]))
    sampler, held_views = _sampler(cfg, data, dcfg)
    torch.manual_seed(cfg.seed)
    model = FusedDecoder(dcfg).to(device)
    opt = torch.optim.AdamW(param_groups(model, weight_decay=cfg.weight_decay, no_decay=DECODER_NO_DECAY),
                            lr=cfg.lr, betas=(0.9, 0.98))
    state_path = out.with_name(out.name + ".state.pt")
    run = _resume(state_path, out, cfg, model=model, opt=opt, sampler=sampler) if resume else _Progress()
    encoder_meta = {"spec": cfg.model, "embed_dim": dcfg.embed_dim, "weights": enc.info.weights}

    def record() -> dict:
        return {"config": asdict(cfg), "parameters": count_parameters(model), "steps": run.step,
                "train_seconds": round(run.seconds, 1), "prepare_seconds": round(prep_s, 1),
                "heldout_views": len(held_views), "history": run.history, "device": str(device)}

    def save() -> None:
        save_decoder(out, model, encoder=encoder_meta, records={"training": record()})
        st = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": sampler.rng.bit_generator.state,
              "step": run.step, "history": run.history, "seconds": run.seconds, "seen": sorted(run.seen),
              "config": asdict(cfg)}
        atomic_write(state_path, lambda tmp: torch.save(st, tmp))

    bar = tqdm(total=cfg.steps, initial=run.step, desc="train-decoder", unit="step", disable=not progress)
    losses: list[float] = []
    while run.step < cfg.steps:
        model.train()
        t = time.time()
        losses.append(_train_step(model, opt, sampler, cfg, dcfg, device, run))
        run.step += 1
        run.seconds += time.time() - t
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
            run.history.append(_heldout_entry(model, data, held_views, cfg, device, run, losses))
            bar.write(json.dumps(run.history[-1]))
            save()
    bar.close()
    rec = record()
    if cfg.ship:
        run.seen.update(range(49406, 49408))
        save_decoder(out, model, encoder=encoder_meta, records={"training": rec}, half=True,
                     compact_token_ids=sorted(run.seen))
    Path(str(out) + ".json").write_text(json.dumps(rec, indent=2))
    return rec
