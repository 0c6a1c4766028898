"""Contrastive training (``clipdex train``): CLIP's symmetric InfoNCE with a learnable temperature.

Hard negatives, as NegCLIP does: each caption's foils (the same words with the related objects swapped,
or attributes swapped between objects) join the image->text softmax as extra negatives, so the text
tower must read word order and binding, not a bag of words. AdamW, linear warm-up then cosine decay to 0
(:mod:`clipdex.retrieval.training.schedule`), bf16 autocast on GPU. With ``layout_weight`` on a world
manifest, a shared linear head must read each shape's and colour's position from both towers' embeddings
(:mod:`clipdex.retrieval.training.layout`). Every ``save_every`` steps and at each epoch's end the run
writes ``last.safetensors`` + ``last.state.pt`` (atomically); ``resume`` continues from them at the exact
batch.
After each epoch: held-out recall@1/5/10 both ways and foil accuracy (``metrics.jsonl``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from clipdex.data_manifests.pairs import load_pairs
from clipdex.exceptions import ClipdexError
from clipdex.files import atomic_write
from clipdex.retrieval.evaluation.recall import evaluate_retrieval
from clipdex.retrieval.models import checkpoint as ckpt
from clipdex.retrieval.models.device import autocast, resolve_device
from clipdex.retrieval.models.encoder import DualEncoder, build_model, encode_text_trimmed
from clipdex.retrieval.models.images import default_workers
from clipdex.retrieval.models.registry import get_model_config
from clipdex.retrieval.training.counterfactual import (
    CounterfactualBatches,
    CounterfactualConfig,
    CurriculumBatches,
    TrainingBatch,
    parse_curriculum,
)
from clipdex.retrieval.training.data import (
    CaptionedImages,
    Collate,
    EpochBatches,
    single_thread_worker,
)
from clipdex.retrieval.training.layout import LayoutHead
from clipdex.retrieval.training.schedule import (
    ENCODER_NO_DECAY,
    cosine_lr,
    param_groups,
    set_lr,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of one training run. ``clipdex train`` sets each field from the flag of its name (``--out``
    is ``out_dir``, ``--time-budget`` is ``time_budget_s``, ``--no-hard-negatives`` clears ``hard_negatives``,
    an empty ``--train-split``/``--eval-split`` is None) and ``command`` from its own command line;
    ``aug_scale`` has no flag. ``--no-resume`` is :func:`train`'s ``resume``, not a field."""

    manifest: str
    out_dir: str
    model: str = "clipdex-s:random"  # where to start: ARCH:random trains from scratch; any spec fine-tunes
    train_split: str | None = "train"  # None: every row
    eval_split: str | None = "test"  # None: no held-out evaluation
    epochs: int = 10
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 200
    hard_negatives: bool = True
    foil_weight: float = 1.0  # weight of the focused caption-vs-foil term (0 = NegCLIP's extra negatives only)
    layout_weight: float = 0.0  # weight of the layout head's loss on images + captions (world manifests only)
    counterfactual: bool = False  # train on world scenes rendered per step in layout groups (the manifest is
    # then only the held-out set); see retrieval/training/counterfactual.py
    variants: int = 4  # counterfactual: layouts per group (batch_size / variants groups per batch)
    epoch_steps: int = 100  # counterfactual: steps between held-out evaluations (an "epoch" of fresh scenes)
    curriculum: str = ""  # counterfactual: stages of counterfactual.STAGES with their shares of the steps,
    # "lone:0.2,pairs:0.25,mixed:0.55"; "" = the default mix throughout
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


def contrastive_loss(img: torch.Tensor, cap: torch.Tensor, foil: torch.Tensor | None, scale: torch.Tensor,
                     *, foil_owner: torch.Tensor | None = None, foil_weight: float = 0.0,
                     also_true: torch.Tensor | None = None):
    """Symmetric InfoNCE; ``foil`` rows (F, D) are extra negatives for image->text. Inputs are normalised.

    With ``foil_weight`` > 0 and ``foil_owner`` (F,) naming each foil's image, add a focused term: for each
    foil, a two-way softmax between its image's true caption and the foil (logistic loss on the margin).
    ``also_true`` (B, B) bool marks caption j as true of image i too (i != j): such pairs are no negatives.
    """
    texts = cap if foil is None else torch.cat([cap, foil])  # (B + F, D)
    labels = torch.arange(img.shape[0], device=img.device)
    logits_i2t = scale * img @ texts.T  # (B, B + F)
    logits_t2i = scale * cap @ img.T  # (B, B)
    if also_true is not None:
        b = img.shape[0]
        logits_i2t = torch.cat([logits_i2t[:, :b].masked_fill(also_true, float("-inf")), logits_i2t[:, b:]], 1)
        logits_t2i = logits_t2i.masked_fill(also_true.T, float("-inf"))
    loss = (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
    if foil is not None and foil_weight > 0 and foil_owner is not None and len(foil_owner):
        own = img[foil_owner]  # (F, D)
        margin = scale * ((own * cap[foil_owner]).sum(-1) - (own * foil).sum(-1))  # (F,)
        loss = loss + foil_weight * F.softplus(-margin).mean()
    return loss


def _arch_config(loaded) -> dict:
    cfg = loaded.meta.model_config if loaded.meta else get_model_config(loaded.arch)
    if cfg is None:
        raise ClipdexError(f"cannot record the config of {loaded.arch}; train from a registered architecture")
    return cfg


class _Run:
    """One training run's moving parts: the model, optimizer, optional layout head, the token-use mask and
    the state a resume restores. ``train`` drives it: resume, then epochs of steps, then the final export."""

    def __init__(self, config: TrainConfig, *, resume: bool):
        self.config = config
        self.out = Path(config.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        self.pairs = None if config.counterfactual else load_pairs(config.manifest, split=config.train_split)
        self.eval_pairs = load_pairs(config.manifest, split=config.eval_split) if config.eval_split else None
        self.state = TrainState()
        self.last_w, self.last_s = self.out / "last.safetensors", self.out / "last.state.pt"
        resuming = resume and self.last_w.exists() and self.last_s.exists()
        self.loaded = build_model(str(self.last_w) if resuming else config.model,
                                  aug_cfg={"scale": tuple(config.aug_scale)})
        self.arch, self.model_config = self.loaded.arch, _arch_config(self.loaded)
        self.model = self.loaded.model.to(self.device).train()
        groups = param_groups(self.model, weight_decay=config.weight_decay, no_decay=ENCODER_NO_DECAY)
        self.layout_head = None
        if config.layout_weight > 0:  # a training-only head: kept in last.state.pt for resume, not in the model
            self.layout_head = LayoutHead(int(self.model.text_projection.shape[1])).to(self.device)
            groups.append({"params": list(self.layout_head.parameters()), "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
        if resuming:
            self._resume()
        self.emb = getattr(self.model, "token_embedding", None)
        self.used = (torch.zeros(self.emb.weight.shape[0], dtype=torch.bool, device=self.device)
                     if self.emb is not None else None)
        if self.used is not None and self.state.used_tokens:
            self.used[torch.tensor(self.state.used_tokens, device=self.device)] = True

    def _resume(self) -> None:
        saved = torch.load(self.last_s, map_location="cpu", weights_only=True)
        if (self.layout_head is not None) != ("layout_head" in saved):
            raise ClipdexError(f"{self.out}: the run there was started "
                               f"{'without' if self.layout_head is not None else 'with'} --layout-weight; resume "
                               "it with the same setting, or start over with --no-resume")
        self.opt.load_state_dict(saved["optimizer"])
        if self.layout_head is not None:
            self.layout_head.load_state_dict(saved["layout_head"])
        self.state = TrainState(**json.loads(saved["state"]))
        logger.info("resuming %s at step %d", self.out, self.state.step)

    def save(self, path_w: Path, *, half: bool = False, compact: bool = False, records: dict | None = None) -> None:
        """Write the model (optionally fp16 with only the token rows training used) to ``path_w``."""
        meta = ckpt.CheckpointMeta(arch=self.arch, model_config=self.model_config, records=records or {})
        token_ids = self.used.nonzero().flatten().tolist() if (compact and self.used is not None) else None
        ckpt.save_checkpoint(path_w, state_dict=self.model.state_dict(), meta=meta, half=half,
                             compact_token_ids=token_ids)

    def checkpoint(self) -> None:
        """Write ``last.safetensors`` and ``last.state.pt``: everything a resume needs."""
        self.state.used_tokens = self.used.nonzero().flatten().tolist() if self.used is not None else []
        self.save(self.last_w, records={"training": {"step": self.state.step}})
        payload = {"optimizer": self.opt.state_dict(), "state": json.dumps(asdict(self.state))}
        if self.layout_head is not None:
            payload["layout_head"] = self.layout_head.state_dict()
        atomic_write(self.last_s, lambda tmp: torch.save(payload, tmp))

    def loader(self, dataset: CaptionedImages, *, epoch: int, skip: int, workers: int):
        """The batches of ``epoch``, the first ``skip`` of them left out (a resume mid-epoch)."""
        cfg = self.config
        sampler = EpochBatches(len(dataset), batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch, skip=skip,
                               groups=dataset.group_keys())
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                           collate_fn=Collate(self.loaded.tokenizer),
                                           pin_memory=self.device.type == "cuda",
                                           worker_init_fn=single_thread_worker if workers else None,
                                           persistent_workers=False, prefetch_factor=4 if workers else None)

    def counterfactual_loader(self, dataset: CounterfactualBatches, *, epoch: int, skip: int, workers: int):
        """The steps of ``epoch`` (``epoch_steps`` of them), the first ``skip`` left out (a resume)."""
        first = epoch * self.config.epoch_steps
        steps = range(first + skip, min(first + self.config.epoch_steps, len(dataset)))
        return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=steps, num_workers=workers,
                                           collate_fn=TrainingBatch(layout=self.layout_head is not None),
                                           pin_memory=self.device.type == "cuda",
                                           worker_init_fn=single_thread_worker if workers else None,
                                           prefetch_factor=2 if workers else None)

    def step(self, batch, *, lr: float) -> dict[str, torch.Tensor]:
        """One optimizer step on ``batch``; returns the losses and the temperature, for the progress bar."""
        cfg, device, model = self.config, self.device, self.model
        images, caps, foils, foil_owner, layout, *rest = batch
        also_true = rest[0].to(device) if rest else None
        set_lr(self.opt, lr)
        images, caps = images.to(device, non_blocking=True), caps.to(device, non_blocking=True)
        foils = foils.to(device, non_blocking=True) if foils is not None else None
        shown = {}
        with autocast(device, cfg.precision):
            img = model.encode_image(images, normalize=True)
            txt = F.normalize(encode_text_trimmed(model, caps if foils is None else torch.cat([caps, foils])), dim=-1)
            scale = model.logit_scale.exp().clamp(max=100)
            loss = contrastive_loss(img.float(), txt[: len(caps)].float(),
                                    txt[len(caps):].float() if foils is not None else None, scale.float(),
                                    foil_owner=foil_owner.to(device), foil_weight=cfg.foil_weight,
                                    also_true=also_true)
            if self.layout_head is not None:
                (img_xy, img_m, img_o), (cap_xy, cap_m, cap_o) = [[t.to(device) for t in part] for part in layout]
                shown["layout"] = (self.layout_head.loss(img.float(), img_xy, img_m, img_o)
                                   + self.layout_head.loss(txt[: len(caps)].float(), cap_xy, cap_m, cap_o))
                loss = loss + cfg.layout_weight * shown["layout"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.used is not None and self.emb.weight.grad is not None:
            self.used |= self.emb.weight.grad.detach().abs().sum(1) > 0
        self.opt.step()
        self.state.step += 1
        return {"loss": loss, "scale": scale, **shown}

    def end_of_epoch(self, *, epoch: int, loss: float, t_start: float, workers: int, bar) -> None:
        """Held-out evaluation (when there is a split for it), a ``metrics.jsonl`` row and a checkpoint."""
        state = self.state
        state.seconds = time.time() - t_start
        row = {"epoch": epoch + 1, "step": state.step, "seconds": round(state.seconds, 1), "loss": round(loss, 4)}
        if self.eval_pairs is not None:
            self.model.eval()
            self.loaded.model = self.model
            enc = DualEncoder(self.loaded, device=str(self.device), precision=self.config.precision)
            row["eval"] = evaluate_retrieval(enc, self.eval_pairs, gallery=self.config.eval_gallery, workers=workers)
            self.model.train()
            logger.info("epoch %d: %s", epoch + 1, json.dumps(row["eval"]))
            if not bar.disable:  # never into --json's stdout
                foil = row["eval"]["foil"]
                kinds = " ".join(f"{k} {v['all']['accuracy']:.3f}" for k, v in foil.get("by_kind", {}).items())
                spatial2 = foil.get("by_kind", {}).get("spatial", {}).get("2 objects")
                bar.write(f"epoch {epoch + 1}: t2i R@1 {row['eval']['t2i']['recall@1']:.3f} "
                          f"i2t R@1 {row['eval']['i2t']['recall@1']:.3f} foils: {kinds}"
                          + (f" (spatial, 2 objects: {spatial2['accuracy']:.3f})" if spatial2 else ""))
        state.history.append(row)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.checkpoint()

    def finish(self, *, t_start: float) -> dict:
        """Write ``model.safetensors``, its compact export and ``train.json``; returns the record."""
        cfg, device, state = self.config, self.device, self.state
        record = {
            "command": cfg.command,
            "config": {k: v for k, v in asdict(cfg).items() if k != "command"},
            "arch": self.arch,
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "steps": state.step,
            "seconds": round(time.time() - t_start, 1),
            "history": state.history,
            "final": state.history[-1].get("eval") if state.history else None,
        }
        self.save(self.out / "model.safetensors", records={"training": record})
        self.save(self.out / "model-compact.safetensors", half=True, compact=True, records={"training": record})
        (self.out / "train.json").write_text(json.dumps(record, indent=2))
        return record


class _TimeBudget:
    """Fits a run into ``seconds`` of training: times 50 steps (after 20 to let the loader warm up) and then
    sets the total step count, and so the cosine schedule, from the measured rate."""

    def __init__(self, seconds: float | None, *, first_step: int):
        self.seconds, self.probe_at, self.probe_t = seconds, first_step + 20, None

    def total(self, step: int, total: int, *, t_start: float) -> int:
        """The run's total steps after ``step`` (``total`` unless the budget just set a smaller one)."""
        if not self.seconds:
            return total
        if step == self.probe_at:
            self.probe_t = time.time()
        elif self.probe_t and step == self.probe_at + 50:
            rate = 50 / (time.time() - self.probe_t)
            fit = step + int(rate * (self.seconds - (time.time() - t_start)))
            if fit < total:
                total = max(step + 1, fit)
                logger.info("time budget %.0f s at %.1f steps/s: %d steps in all", self.seconds, rate, total)
        return total


def _curriculum(config: TrainConfig) -> tuple[tuple[str, float], ...]:
    """The run's curriculum stages, checked against the rest of its config."""
    try:
        stages = parse_curriculum(config.curriculum)
    except ValueError as e:
        raise ClipdexError(f"--curriculum: {e}") from None
    if stages and config.time_budget_s:
        raise ClipdexError("--curriculum sets its stages from the run's step count, which --time-budget would change "
                           "mid-run: give --max-steps (or --epochs x --epoch-steps) instead")
    return stages


def train(config: TrainConfig, *, resume: bool = True, progress: bool = True) -> dict:
    """Run (or resume) training; returns the final record (also written to ``out_dir/train.json``)."""
    from tqdm.auto import tqdm

    if config.curriculum and not config.counterfactual:
        raise ClipdexError("--curriculum stages counterfactual batches: add --counterfactual")
    stages = _curriculum(config)  # checked before anything is built or written
    run = _Run(config, resume=resume)
    state = run.state
    workers = default_workers() if config.workers is None else config.workers
    if config.counterfactual:
        if config.batch_size % config.variants:
            raise ClipdexError(f"--batch-size {config.batch_size} is not a multiple of --variants {config.variants}")
        steps_per_epoch = config.epoch_steps
        total = min(config.epochs * steps_per_epoch, config.max_steps or config.epochs * steps_per_epoch)
        cf = CounterfactualConfig(groups=config.batch_size // config.variants, variants=config.variants,
                                  seed=config.seed)
        common = {"transform": run.loaded.preprocess_train, "tokenizer": run.loaded.tokenizer, "steps": total,
                  "hard_negatives": config.hard_negatives}
        dataset = CurriculumBatches(cf, stages, **common) if stages else CounterfactualBatches(cf, **common)
        workers = max(1, workers)  # rendering runs beside the model, not before each step
    else:
        dataset = CaptionedImages(run.pairs, run.loaded.preprocess_train, seed=config.seed,
                                  hard_negatives=config.hard_negatives, layout=run.layout_head is not None)
        if len(dataset) < config.batch_size:
            raise ClipdexError(f"{config.manifest}: {len(dataset)} captioned images in split "
                               f"{config.train_split!r}, fewer than one batch of {config.batch_size}")
        steps_per_epoch = len(dataset) // config.batch_size
        total = min(config.epochs * steps_per_epoch, config.max_steps or config.epochs * steps_per_epoch)
    t_start = time.time() - state.seconds
    budget = _TimeBudget(config.time_budget_s, first_step=state.step)
    bar = tqdm(total=total, initial=state.step, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    while state.step < total:
        epoch, skip = divmod(state.step, steps_per_epoch)
        dataset.epoch = epoch
        batches = (run.counterfactual_loader(dataset, epoch=epoch, skip=skip, workers=workers) if config.counterfactual
                   else run.loader(dataset, epoch=epoch, skip=skip, workers=workers))
        for batch in batches:
            lr = cosine_lr(state.step, base=config.lr, warmup=config.warmup_steps, total=total)
            out = run.step(batch, lr=lr)
            bar.total = total = budget.total(state.step, total, t_start=t_start)
            bar.update(1)
            shown = {"layout": f"{out['layout'].item():.3f}"} if "layout" in out else {}
            bar.set_postfix(loss=f"{out['loss'].item():.3f}", lr=f"{lr:.1e}", scale=f"{out['scale'].item():.1f}",
                            epoch=epoch + 1, **shown)
            if state.step % config.save_every == 0:
                state.seconds = time.time() - t_start
                run.checkpoint()
            if state.step >= total:
                break
        if state.step % steps_per_epoch == 0 or state.step >= total:
            run.end_of_epoch(epoch=epoch, loss=out["loss"].item(), t_start=t_start, workers=workers, bar=bar)
    bar.close()
    return run.finish(t_start=t_start)
