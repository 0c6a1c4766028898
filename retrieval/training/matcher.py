"""clipdex train-matcher: teach a cross-attention matcher (:mod:`clipdex.retrieval.models.matcher`) which
captions fit which images, on counterfactual batches, with the dual encoder frozen.

Every step renders a fresh batch of layout groups (:class:`~clipdex.retrieval.training.counterfactual.CounterfactualBatches`),
reads the frozen encoder's patch-token grids and caption token states, and scores pairs: each image with its
own caption (a match) and with the captions that are false of it — its group-mates' (the same objects
elsewhere, the foil scene rendered as an image), its own caption's foils (relation or attributes swapped),
the other-group caption the dual encoder likes best for it, and one at random. Labels come from the
world's claims (:func:`~clipdex.data_manifests.world.claims.satisfies`), so a caption that happens to be
true of an image is never called a mismatch. Loss: binary cross-entropy, matches and mismatches weighted
equally.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipdex.data_manifests.world.claims import satisfies
from clipdex.retrieval.models.encoder import (
    GRID_SIDE,
    image_tokens,
    load_encoder,
    pooled_text,
    text_tokens_by_length,
)
from clipdex.retrieval.models.matcher import Matcher, MatcherConfig, save_matcher
from clipdex.retrieval.training.counterfactual import CounterfactualBatches, CounterfactualConfig
from clipdex.retrieval.training.schedule import cosine_lr, param_groups, set_lr


@dataclass
class MatcherTrainConfig:
    """A matcher run: the frozen encoder it reads, its shape, the batches and the schedule."""

    encoder: str = "clipdex-world"
    out: Path = Path("matcher.safetensors")
    steps: int = 1500
    pool: int = 100  # counterfactual batches rendered and encoded once, then cycled through
    pairs_per_step: int = 512  # drawn from the batch's labelled pairs (about 7 per image)
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    batches: CounterfactualConfig = field(default_factory=lambda: CounterfactualConfig(
        groups=32, variants=4, count_prob=0.15))
    seed: int = 0
    workers: int = 1


@dataclass
class Pairs:
    """The (image, text, label) pairs of one batch; texts index the batch's captions then its foils."""

    image: torch.Tensor
    text: torch.Tensor
    label: torch.Tensor


def batch_pairs(batch, img_emb: torch.Tensor, cap_emb: torch.Tensor, rng: np.random.Generator) -> Pairs:
    """Pairs of one counterfactual batch (see the module docstring); ``img_emb``/``cap_emb`` are the dual
    encoder's normalised embeddings, used to pick each image's hardest other-group caption."""
    n = len(batch.texts)
    group = np.asarray(batch.group)
    sim = (img_emb @ cap_emb.T).numpy()
    rows: list[tuple[int, int, float]] = []
    for i in range(n):
        rows.append((i, i, 1.0))
        for j in np.flatnonzero(group == group[i]):
            if j != i:
                rows.append((i, int(j), float(satisfies(batch.claims[j], batch.scenes[i]))))
        others = np.flatnonzero(group != group[i])
        if len(others):
            hard = int(others[np.argmax(sim[i, others])])
            rand = int(rng.choice(others))
            for j in {hard, rand}:
                rows.append((i, j, float(satisfies(batch.claims[j], batch.scenes[i]))))
    for f, owner in enumerate(batch.foil_owner.tolist()):
        rows.append((owner, n + f, 0.0))
    t = torch.tensor(rows, dtype=torch.float32)
    return Pairs(image=t[:, 0].long(), text=t[:, 1].long(), label=t[:, 2])


@dataclass
class CachedBatch:
    """One counterfactual batch as the matcher sees it: the frozen encoder's outputs and the labelled pairs."""

    grids: torch.Tensor  # (B, cells, image_dim) fp16
    states: torch.Tensor  # (T, n, text_dim) fp16: the captions, then the foils
    mask: torch.Tensor  # (T, n) bool
    image_emb: torch.Tensor  # (B, D) the dual encoder's normalised embeddings
    text_emb: torch.Tensor  # (T, D)
    pairs: Pairs

    def cosines(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The dual encoder's cosine of each (image, text) pair."""
        return (self.image_emb[image] * self.text_emb[text]).sum(-1)


@torch.no_grad()
def encode_batch(model, batch, rng: np.random.Generator, *, chunk: int = 64) -> CachedBatch:
    """Run the frozen encoder over one counterfactual batch and label its pairs (:func:`batch_pairs`).
    Texts go through the text tower in chunks of similar length, so a long caption does not pad the rest."""
    pooled, grids = image_tokens(model, batch.images)
    tokens = batch.captions if batch.foils is None else torch.cat([batch.captions, batch.foils])
    states, mask = text_tokens_by_length(model, tokens, chunk=chunk)
    txt = F.normalize(pooled_text(model, states, tokens), dim=-1)
    img = F.normalize(pooled, dim=-1)
    pairs = batch_pairs(batch, img, txt[: len(batch.captions)], rng)
    return CachedBatch(grids=grids.half(), states=states.half(), mask=mask, image_emb=img, text_emb=txt,
                       pairs=pairs)


def balanced_bce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy in which matches and mismatches weigh half each, however many there are."""
    loss = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    pos = label > 0.5
    parts = [loss[pos].mean()] if pos.any() else []
    parts += [loss[~pos].mean()] if (~pos).any() else []
    return torch.stack(parts).mean()


def train_matcher(config: MatcherTrainConfig, *, progress: bool = True, log=print, log_every: int = 0) -> dict:
    """Train a matcher on the frozen ``config.encoder`` and save it to ``config.out``; returns the record."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 1])  # which pairs each step trains on
    enc = load_encoder(config.encoder, device="cpu")
    model = enc.model
    for p in model.parameters():
        p.requires_grad_(False)
    width_img = model.visual.ln_post.normalized_shape[0]
    width_txt = 2 * model.ln_final.normalized_shape[0]  # final states and token embeddings (text_tokens)
    matcher = Matcher(MatcherConfig(image_dim=width_img, text_dim=width_txt, cells=GRID_SIDE * GRID_SIDE,
                                    width=config.width, layers=config.layers, heads=config.heads, mlp_ratio=config.mlp_ratio,
                                    max_text=enc.context_length))
    opt = torch.optim.AdamW(param_groups(matcher, weight_decay=config.weight_decay, no_decay=("_pos",)),
                            lr=config.lr)
    data = CounterfactualBatches(config.batches, transform=enc.preprocess, tokenizer=enc.tokenizer,
                                 steps=config.pool)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=config.workers,
                                         collate_fn=lambda b: b)
    from tqdm import tqdm

    t0 = time.time()
    pool = [encode_batch(model, b, np.random.default_rng([config.seed, i]))
            for i, b in enumerate(tqdm(loader, total=config.pool, desc="matcher batches", unit="batch",
                                       disable=not progress))]
    t_pool = time.time() - t0
    bar = tqdm(total=config.steps, desc="matcher", unit="step", disable=not progress)
    losses, accs = [], []
    for step in range(config.steps):
        b = pool[step % len(pool)]
        take = torch.from_numpy(rng.permutation(len(b.pairs.label))[: config.pairs_per_step])
        image, text, label = b.pairs.image[take], b.pairs.text[take], b.pairs.label[take]
        set_lr(opt, cosine_lr(step, base=config.lr, warmup=config.warmup, total=config.steps))
        logits = matcher(b.states, b.mask, b.grids[image], b.cosines(image, text), text)
        loss = balanced_bce(logits, label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(matcher.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        accs.append(float(((logits.detach() > 0).float() == label).float().mean()))
        bar.update(1)
        if step % 25 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", acc=f"{np.mean(accs[-50:]):.3f}")
        if log_every and (step % log_every == 0 or step == config.steps - 1):
            log(f"step {step} loss {np.mean(losses[-log_every:]):.4f} pair acc {np.mean(accs[-log_every:]):.3f}")
    bar.close()
    record = {"encoder": config.encoder, "encoder_weights": enc.info.weights, "steps": config.steps,
              "seconds": round(time.time() - t0, 1),
              "pool_seconds": round(t_pool, 1), "images": config.pool * config.batches.batch_size, "final_loss": float(np.mean(losses[-50:])),
              "final_pair_accuracy": float(np.mean(accs[-50:])),
              "config": json.loads(json.dumps(asdict(config), default=str))}
    save_matcher(matcher, config.out, encoder_weights=enc.info.weights, record=record)
    return record
