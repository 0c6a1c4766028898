"""Contrastive training (``clipdex train``): CLIP's symmetric InfoNCE with a learnable temperature.

Hard negatives, as NegCLIP does: each caption's foils (the same words with the related objects swapped,
or attributes swapped between objects) join the image->text softmax as extra negatives, so the text
tower must read word order and binding, not a bag of words. AdamW, linear warm-up then cosine decay,
bf16 autocast on GPU. With ``layout_weight`` on a world manifest, a shared linear head must read each
shape's and colour's position from both towers' embeddings (:mod:`clipdex.retrieval.training.layout`). Every
``save_every`` steps and at each epoch's end the run writes ``last.safetensors`` + ``last.state.pt``
(atomically); ``resume`` continues from them at the exact batch.
After each epoch: held-out recall@1/5/10 both ways and foil accuracy (``metrics.jsonl``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from clipdex.data_manifests.pairs import load_pairs
from clipdex.retrieval.evaluation.recall import evaluate_retrieval
from clipdex.retrieval.models import checkpoint as ckpt
from clipdex.retrieval.models.device import autocast, resolve_device
from clipdex.retrieval.models.encoder import DualEncoder, build_model
from clipdex.retrieval.models.images import default_workers
from clipdex.retrieval.models.registry import get_model_config
from clipdex.retrieval.training.data import (
    CaptionedImages,
    Collate,
    EpochBatches,
    single_thread_worker,
)
from clipdex.retrieval.training.layout import LayoutHead

from clipdex.exceptions import ClipdexError
from clipdex.files import atomic_write

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of one training run (the CLI's flags map onto these one to one)."""

    manifest: str
    out_dir: str
    model: str = "clipdex-s:random"  # where to start: ARCH:random trains from scratch; any spec fine-tunes
    train_split: str = "train"
    eval_split: str | None = "test"  # None: no held-out evaluation
    epochs: int = 10
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 200
    hard_negatives: bool = True
    foil_weight: float = 1.0  # weight of the focused caption-vs-foil term (0 = NegCLIP's extra negatives only)
    layout_weight: float = 0.0  # weight of the layout head's loss on images + captions (world manifests only)
    eval_gallery: int = 1000
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    save_every: int = 500
    max_steps: int | None = None  # stop early (tests, reproducing a time-boxed run)
    time_budget_s: float | None = None  # fit the run to this many seconds of training: after 50 timed steps
    # the total step count (and so the cosine schedule) is set from the measured rate; the record keeps it
    aug_scale: tuple[float, float] = (0.85, 1.0)  # RandomResizedCrop scale range
    command: str = ""  # the command line, recorded in the checkpoint


@dataclass
class TrainState:
    """What a resume needs besides the weights."""

    step: int = 0
    used_tokens: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def lr_at(step: int, *, base: float, warmup: int, total: int) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * base * (1 + math.cos(math.pi * progress))


def contrastive_loss(img: torch.Tensor, cap: torch.Tensor, foil: torch.Tensor | None, scale: torch.Tensor,
                     *, foil_owner: torch.Tensor | None = None, foil_weight: float = 0.0):
    """Symmetric InfoNCE; ``foil`` rows (F, D) are extra negatives for image->text. Inputs are normalised.

    With ``foil_weight`` > 0 and ``foil_owner`` (F,) naming each foil's image, add a focused term: for each
    foil, a two-way softmax between its image's true caption and the foil (logistic loss on the margin).
    """
    texts = cap if foil is None else torch.cat([cap, foil])  # (B + F, D)
    labels = torch.arange(img.shape[0], device=img.device)
    logits_i2t = scale * img @ texts.T  # (B, B + F)
    logits_t2i = scale * cap @ img.T  # (B, B)
    loss = (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
    if foil is not None and foil_weight > 0 and foil_owner is not None and len(foil_owner):
        own = img[foil_owner]  # (F, D)
        margin = scale * ((own * cap[foil_owner]).sum(-1) - (own * foil).sum(-1))  # (F,)
        loss = loss + foil_weight * F.softplus(-margin).mean()
    return loss


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "logit_scale" in name or "positional_embedding" in name or "class_embedding" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _arch_config(loaded) -> dict:
    cfg = loaded.meta.model_config if loaded.meta else get_model_config(loaded.arch)
    if cfg is None:
        raise ClipdexError(f"cannot record the config of {loaded.arch}; train from a registered architecture")
    return cfg


def train(config: TrainConfig, *, resume: bool = True, progress: bool = True) -> dict:
    """Run (or resume) training; returns the final record (also written to ``out_dir/train.json``)."""
    from tqdm.auto import tqdm

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    pairs = load_pairs(config.manifest, split=config.train_split)
    eval_pairs = load_pairs(config.manifest, split=config.eval_split) if config.eval_split else None

    state = TrainState()
    last_w, last_s = out / "last.safetensors", out / "last.state.pt"
    start_spec = config.model
    if resume and last_w.exists() and last_s.exists():
        start_spec = str(last_w)
    loaded = build_model(start_spec, aug_cfg={"scale": tuple(config.aug_scale)})
    arch, model_config = loaded.arch, _arch_config(loaded)
    model = loaded.model.to(device).train()
    groups = _param_groups(model, config.weight_decay)
    layout_head = None
    if config.layout_weight > 0:  # a training-only head: kept in last.state.pt for resume, not in the model
        layout_head = LayoutHead(int(model.text_projection.shape[1])).to(device)
        groups.append({"params": list(layout_head.parameters()), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    if start_spec == str(last_w):
        saved = torch.load(last_s, map_location="cpu", weights_only=True)
        if (layout_head is not None) != ("layout_head" in saved):
            raise ClipdexError(f"{out}: the run there was started {'without' if layout_head is not None else 'with'} "
                               "--layout-weight; resume it with the same setting, or start over with --no-resume")
        opt.load_state_dict(saved["optimizer"])
        if layout_head is not None:
            layout_head.load_state_dict(saved["layout_head"])
        state = TrainState(**json.loads(saved["state"]))
        logger.info("resuming %s at step %d", out, state.step)

    dataset = CaptionedImages(pairs, loaded.preprocess_train, seed=config.seed, hard_negatives=config.hard_negatives,
                              layout=layout_head is not None)
    if len(dataset) < config.batch_size:
        raise ClipdexError(f"{config.manifest}: {len(dataset)} captioned images in split "
                           f"{config.train_split!r}, fewer than one batch of {config.batch_size}")
    steps_per_epoch = len(dataset) // config.batch_size
    total = config.epochs * steps_per_epoch
    if config.max_steps:
        total = min(total, config.max_steps)
    workers = default_workers() if config.workers is None else config.workers
    emb = getattr(model, "token_embedding", None)
    used = torch.zeros(emb.weight.shape[0], dtype=torch.bool, device=device) if emb is not None else None
    if used is not None and state.used_tokens:
        used[torch.tensor(state.used_tokens, device=device)] = True

    def save(path_w: Path, *, half=False, compact=False, records=None):
        meta = ckpt.CheckpointMeta(arch=arch, model_config=model_config, records=records or {})
        token_ids = used.nonzero().flatten().tolist() if (compact and used is not None) else None
        ckpt.save_checkpoint(path_w, state_dict=model.state_dict(), meta=meta, half=half, compact_token_ids=token_ids)

    def checkpoint_now():
        state.used_tokens = used.nonzero().flatten().tolist() if used is not None else []
        save(last_w, records={"training": {"step": state.step}})
        payload = {"optimizer": opt.state_dict(), "state": json.dumps(asdict(state))}
        if layout_head is not None:
            payload["layout_head"] = layout_head.state_dict()
        atomic_write(last_s, lambda tmp: torch.save(payload, tmp))

    t_start = time.time() - state.seconds
    probe_at, probe_t = state.step + 20, None  # time steps probe_at..probe_at+50, after warm-up of the loader
    bar = tqdm(total=total, initial=state.step, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    while state.step < total:
        epoch, skip = divmod(state.step, steps_per_epoch)
        dataset.epoch = epoch
        sampler = EpochBatches(len(dataset), batch_size=config.batch_size, seed=config.seed, epoch=epoch, skip=skip,
                               groups=dataset.group_keys())
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                             collate_fn=Collate(loaded.tokenizer), pin_memory=device.type == "cuda",
                                             worker_init_fn=single_thread_worker if workers else None,
                                             persistent_workers=False, prefetch_factor=4 if workers else None)
        for images, caps, foils, foil_owner, layout in loader:
            lr = lr_at(state.step, base=config.lr, warmup=config.warmup_steps, total=total)
            for group in opt.param_groups:
                group["lr"] = lr
            images, caps = images.to(device, non_blocking=True), caps.to(device, non_blocking=True)
            foils = foils.to(device, non_blocking=True) if foils is not None else None
            with autocast(device, config.precision):
                img = model.encode_image(images, normalize=True)
                texts = caps if foils is None else torch.cat([caps, foils])
                txt = model.encode_text(texts, normalize=True)
                scale = model.logit_scale.exp().clamp(max=100)
                loss = contrastive_loss(img.float(), txt[: len(caps)].float(),
                                        txt[len(caps):].float() if foils is not None else None, scale.float(),
                                        foil_owner=foil_owner.to(device), foil_weight=config.foil_weight)
                if layout_head is not None:
                    (img_xy, img_m, img_o), (cap_xy, cap_m, cap_o) = [[t.to(device) for t in part] for part in layout]
                    layout_loss = (layout_head.loss(img.float(), img_xy, img_m, img_o)
                                   + layout_head.loss(txt[: len(caps)].float(), cap_xy, cap_m, cap_o))
                    loss = loss + config.layout_weight * layout_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if used is not None and emb.weight.grad is not None:
                used |= emb.weight.grad.detach().abs().sum(1) > 0
            opt.step()
            state.step += 1
            if config.time_budget_s and state.step == probe_at:
                probe_t = time.time()
            elif config.time_budget_s and probe_t and state.step == probe_at + 50:
                rate = 50 / (time.time() - probe_t)
                fit = state.step + int(rate * (config.time_budget_s - (time.time() - t_start)))
                if fit < total:
                    total = max(state.step + 1, fit)
                    bar.total = total
                    logger.info("time budget %.0f s at %.1f steps/s: %d steps in all", config.time_budget_s, rate, total)
            bar.update(1)
            shown = {"layout": f"{layout_loss.item():.3f}"} if layout_head is not None else {}
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", scale=f"{scale.item():.1f}", epoch=epoch + 1,
                            **shown)
            if state.step % config.save_every == 0:
                state.seconds = time.time() - t_start
                checkpoint_now()
            if state.step >= total:
                break
        if state.step % steps_per_epoch == 0 or state.step >= total:
            state.seconds = time.time() - t_start
            row = {"epoch": epoch + 1, "step": state.step, "seconds": round(state.seconds, 1), "loss": round(loss.item(), 4)}
            if eval_pairs is not None:
                model.eval()
                loaded.model = model
                enc = DualEncoder(loaded, device=str(device), precision=config.precision)
                row["eval"] = evaluate_retrieval(enc, eval_pairs, gallery=config.eval_gallery, workers=workers)
                model.train()
                logger.info("epoch %d: %s", epoch + 1, json.dumps(row["eval"]))
                bar.write(f"epoch {epoch + 1}: t2i R@1 {row['eval']['t2i']['recall@1']:.3f} "
                          f"i2t R@1 {row['eval']['i2t']['recall@1']:.3f} foil {row['eval']['foil']}")
            state.history.append(row)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            checkpoint_now()
    bar.close()
    record = {
        "command": config.command,
        "config": {k: v for k, v in asdict(config).items() if k != "command"},
        "arch": arch,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "steps": state.step,
        "seconds": round(time.time() - t_start, 1),
        "history": state.history,
        "final": state.history[-1].get("eval") if state.history else None,
    }
    save(out / "model.safetensors", records={"training": record})
    save(out / "model-compact.safetensors", half=True, compact=True, records={"training": record})
    (out / "train.json").write_text(json.dumps(record, indent=2))
    return record
