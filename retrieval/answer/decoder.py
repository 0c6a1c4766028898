"""The built-in fused decoder: a small causal transformer that answers from retrieved captions and images.

One sequence holds everything, in this order (segments tell the parts apart; item embeddings tell which
retrieved item a token belongs to):

    [query image: M visual tokens] [question text] ([item i: M visual tokens] [item i caption]) * k [BOS answer]

**A prefix, not cross-attention.** The context is short (k ~ 5 captions of ~40 tokens, M visual tokens per
image), so one decoder-only stack reading everything in a single causal sequence (as nanoGPT, ClipCap and
SmallCap's prefix variant do) is simpler than an encoder plus cross-attention, costs the same at this
length, and every layer can mix question, images and captions. Each item's tokens also carry its image's cosine
similarity to the query image: which retrieved landmark is the photographed one is the retriever's
evidence, and without it the decoder had to learn that comparison from the projected embeddings alone
(it often copied the facts of a look-alike distractor). Visual tokens are the dual encoder's pooled
embedding projected to M tokens (ClipCap's mapping network): it is what the store already holds for every
indexed image, so retrieved images need no re-encoding.

**A copy head (pointer-generator).** Landmark facts are made-up words the decoder never saw in training;
generating them from the vocabulary alone is how a decoder ends up reciting memorised facts. The output
distribution mixes the vocabulary softmax with a copy distribution, an attention over the context's
text tokens (See et al., 2017): ``p(w) = g * softmax(W h)[w] + (1 - g) * sum_{s: x_s = w} a_s``. Copy keys
also see the token *before* each position, and a position whose previous token is the one just written gets a
learned bonus, so "copy the token after the one I just wrote" (what an induction head learns slowly) is there
from the start: without it the first trained decoders copied a name's first piece right and then stuttered
("rairairai"). As in See et al., the gate and the vocabulary also see what the copy head points at, so
"the next source token is a comma" can end the answer. The copy attention is also the honest evidence
measure: each retrieved item's weight is the share of the answer's probability mass that came from it
(the copy mass on its tokens, plus the vocabulary share times the last layer's attention on it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# segment ids
SEG_QUERY_IMAGE, SEG_QUESTION, SEG_ITEM_IMAGE, SEG_ITEM_TEXT, SEG_ANSWER = range(5)
N_SEGMENTS = 5
IGNORE = -100


@dataclass(frozen=True)
class DecoderConfig:
    """The decoder's shape; saved in every checkpoint (nanoGPT's ``model_args``)."""

    vocab_size: int = 49408  # open_clip's BPE vocabulary (its tokenizer is the decoder's tokenizer)
    embed_dim: int = 256  # the dual encoder's embedding size: the visual features going in
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    max_len: int = 384  # longest sequence (context + answer), in tokens
    image_tokens: int = 4  # visual tokens per image (M)
    max_items: int = 8  # most retrieved items a sequence may hold
    dropout: float = 0.1
    bos_id: int = 49406  # the answer's start token (open_clip's start-of-text)

    def as_dict(self) -> dict:
        """The config as a JSON-ready dict."""
        return asdict(self)


@dataclass
class Batch:
    """A padded batch of sequences (B sequences of T tokens, I images each at most).

    ``tokens`` (B, T) token ids (0 at image slots and padding); ``segments`` (B, T); ``items`` (B, T): 0, or
    1 + the retrieved item's index; ``image_slot`` (B, T): index into the batch's visual tokens (I * M), -1
    for text; ``images`` (B, I, E) pooled embeddings; ``copyable`` (B, T) bool: context text a copy may come
    from; ``targets`` (B, T): the next token to predict at answer positions, IGNORE elsewhere;
    ``lengths`` (B,): real tokens per sequence; ``item_sim`` (B, T): on an item's tokens, the cosine
    similarity of its image to the query image (the retriever's own evidence), 0 elsewhere.
    """

    tokens: torch.Tensor
    segments: torch.Tensor
    items: torch.Tensor
    image_slot: torch.Tensor
    images: torch.Tensor
    copyable: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor
    item_sim: torch.Tensor

    def to(self, device) -> "Batch":
        """The batch on ``device``."""
        return Batch(**{k: v.to(device) for k, v in self.__dict__.items()})


class SelfAttention(nn.Module):
    """Causal multi-head self-attention; returns the head-averaged attention map when asked."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, *, need_weights: bool = False):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, h, T, c)
        if not need_weights:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
            att = None
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, h, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            y = att @ v
            att = att.mean(1)  # (B, T, T)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y), att


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, *, need_weights: bool = False):
        a, att = self.attn(self.ln1(x), need_weights=need_weights)
        x = x + a
        return x + self.mlp(self.ln2(x)), att


@dataclass
class StepOutput:
    """What the model says at the selected positions (N of them): log-probabilities need the vocab."""

    vocab_logp: torch.Tensor  # (N, V) log-softmax of the vocabulary logits
    copy_attn: torch.Tensor  # (N, T) copy attention over the sequence (0 where not copyable)
    gate: torch.Tensor  # (N,) g: the vocabulary's share
    last_attn: torch.Tensor | None  # (N, T) last layer's head-averaged attention (when asked)


class FusedDecoder(nn.Module):
    """The decoder: embeddings (token, position, segment, item, visual projection), blocks, a copy head."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.wpe = nn.Embedding(cfg.max_len, d)
        self.wse = nn.Embedding(N_SEGMENTS, d)
        self.wie = nn.Embedding(cfg.max_items + 1, d)
        self.wsim = nn.Linear(1, d)  # an item's similarity to the query image, on each of its tokens
        self.visual = nn.Sequential(nn.Linear(cfg.embed_dim, d * cfg.image_tokens // 2), nn.Tanh(),
                                    nn.Linear(d * cfg.image_tokens // 2, d * cfg.image_tokens))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.copy_q = nn.Linear(d, d)
        self.copy_k = nn.Linear(d, d)
        self.copy_k_prev = nn.Linear(d, d, bias=False)  # the previous token's embedding, in the copy key
        self.copy_continue = nn.Linear(d, 1)  # bonus for the position right after the last copied token
        self.copy_ctx = nn.Linear(d, d)  # what the copy head points at, fed to the vocabulary and the gate
        self.gate = nn.Linear(2 * d, 1)
        self.apply(self._init)
        nn.init.constant_(self.copy_continue.bias, 2.0)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def embed(self, b: Batch) -> torch.Tensor:
        """The input embeddings (B, T, C): token or visual token, plus position, segment and item."""
        B, T = b.tokens.shape
        x = self.wte(b.tokens)  # (B, T, C)
        vis = self.visual(b.images).view(B, -1, self.cfg.d_model)  # (B, I*M, C)
        slot = b.image_slot.clamp(min=0)
        vis_at = torch.gather(vis, 1, slot[..., None].expand(B, T, self.cfg.d_model))
        x = torch.where((b.image_slot >= 0)[..., None], vis_at, x)
        pos = torch.arange(T, device=x.device)
        sim = self.wsim(b.item_sim[..., None]) * (b.items > 0)[..., None]
        return self.drop(x + self.wpe(pos)[None] + self.wse(b.segments) + self.wie(b.items) + sim)

    def hidden(self, b: Batch, *, need_weights: bool = False):
        """Final hidden states (B, T, C) and, when asked, the last layer's attention (B, T, T)."""
        x = self.embed(b)
        att = None
        for i, block in enumerate(self.blocks):
            x, att = block(x, need_weights=need_weights and i == len(self.blocks) - 1)
        return self.ln_f(x), att

    def step_outputs(self, b: Batch, h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                     att: torch.Tensor | None = None) -> StepOutput:
        """The output distribution's parts at positions (rows[n], cols[n])."""
        hn = h[rows, cols]  # (N, C)
        prev = torch.zeros_like(b.tokens)
        prev[:, 1:] = b.tokens[:, :-1]
        keys = self.copy_k(h) + self.copy_k_prev(self.wte(prev))  # (B, T, C)
        queries = torch.zeros_like(h)
        queries[rows, cols] = self.copy_q(hn)
        scores = (queries @ keys.transpose(1, 2))[rows, cols] / math.sqrt(h.size(-1))  # (N, T)
        T = b.tokens.size(1)
        allowed = b.copyable[rows] & (torch.arange(T, device=h.device)[None] < cols[:, None])
        last = b.tokens[rows, cols]  # (N,) the token just written (or the start token)
        follows = (prev[rows] == last[:, None]) & (last != self.cfg.bos_id)[:, None]  # (N, T)
        scores = scores + self.copy_continue(hn) * follows
        scores = scores.masked_fill(~allowed, float("-inf"))
        can_copy = allowed.any(-1)
        copy_attn = torch.where(can_copy[:, None], scores.softmax(-1).nan_to_num(0.0), torch.zeros_like(scores))
        pointed = torch.bmm(copy_attn.unsqueeze(1), self.wte(b.tokens)[rows]).squeeze(1)  # (N, C)
        ctx = self.copy_ctx(pointed)
        vocab_logp = F.log_softmax((hn + ctx) @ self.wte.weight.T, dim=-1)  # (N, V), tied embeddings
        gate = torch.sigmoid(self.gate(torch.cat([hn, ctx], -1))).squeeze(-1)
        gate = torch.where(can_copy, gate, torch.ones_like(gate))  # nothing to copy: vocabulary only
        return StepOutput(vocab_logp, copy_attn, gate, None if att is None else att[rows, cols])

    def log_prob_of(self, b: Batch, out: StepOutput, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) under the mixed distribution, (N,)."""
        p_vocab = out.vocab_logp.gather(1, targets[:, None]).squeeze(1).exp()
        p_copy = (out.copy_attn * (b.tokens[rows] == targets[:, None])).sum(-1)
        return torch.log(out.gate * p_vocab + (1 - out.gate) * p_copy + 1e-9)

    def forward(self, b: Batch) -> torch.Tensor:
        """Mean negative log-likelihood of the answer tokens."""
        h, _ = self.hidden(b)
        rows, cols = (b.targets != IGNORE).nonzero(as_tuple=True)
        out = self.step_outputs(b, h, rows, cols)
        return -self.log_prob_of(b, out, rows, b.targets[rows, cols]).mean()

    def next_token_logp(self, b: Batch, *, need_weights: bool = False) -> tuple[torch.Tensor, StepOutput]:
        """log p(next token) over the vocabulary (B, V) at each sequence's last real position."""
        h, att = self.hidden(b, need_weights=need_weights)
        rows = torch.arange(b.tokens.size(0), device=h.device)
        cols = b.lengths - 1
        out = self.step_outputs(b, h, rows, cols, att)
        p = out.gate[:, None] * out.vocab_logp.exp()
        p = p.scatter_add(1, b.tokens, (1 - out.gate[:, None]) * out.copy_attn)
        return torch.log(p + 1e-12), out

    def evidence_mass(self, b: Batch, out: StepOutput) -> torch.Tensor:
        """(B, max_items) share of each step's output mass that came from each retrieved item."""
        share = (1 - out.gate[:, None]) * out.copy_attn
        if out.last_attn is not None:
            share = share + out.gate[:, None] * out.last_attn
        onehot = F.one_hot(b.items, self.cfg.max_items + 1).to(share.dtype)  # (B, T, K+1)
        return torch.einsum("bt,btk->bk", share, onehot)[:, 1:]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
