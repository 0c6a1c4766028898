"""The dual encoder: load any model spec, embed images and texts in batches as L2-normalised float32.

open_clip builds the model, its preprocessing (``image_transform``) and its tokenizer; clipdex adds the
spec forms, self-describing checkpoints, batching, device choice and clear errors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipdex.exceptions import CheckpointError, ModelSpecError
from clipdex.retrieval.models import checkpoint as ckpt
from clipdex.retrieval.models.device import autocast, resolve_device
from clipdex.retrieval.models.info import EncoderInfo  # noqa: F401 - also imported from here
from clipdex.retrieval.models.registry import ensure_registered, register_config
from clipdex.retrieval.models.spec import ModelSpec, parse_model_spec

logger = logging.getLogger(__name__)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights that tell two models of one architecture apart: the projections and the
    first and last parameter tensors, as stored (device and precision of inference do not change it)."""
    import hashlib

    params = list(model.named_parameters())
    picked = {n: p for n, p in params if n in ("text_projection", "visual.proj")}
    for n, p in (params[0], params[-1]):
        picked.setdefault(n, p)
    h = hashlib.blake2b(digest_size=8)
    for n in sorted(picked):
        h.update(n.encode())
        h.update(picked[n].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class LoadedModel:
    """An open_clip model with its transforms and tokenizer, before it is wrapped for inference."""

    model: torch.nn.Module
    preprocess_train: object
    preprocess: object
    tokenizer: object
    arch: str
    spec: ModelSpec
    meta: ckpt.CheckpointMeta | None = None


class _QuietRandomInit(logging.Filter):
    """open_clip warns 'initialized randomly' before we load our own weights into the model: drop that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


RANDOM_INIT_SEED = 0  # what ARCH:random draws for search and indexing: the same weights on every load


def build_model(spec: str | ModelSpec, *, aug_cfg: dict | None = None, seed: int | None = None) -> LoadedModel:
    """Build the model a spec names, with its train/eval transforms and tokenizer, on the CPU in fp32.

    ``seed``: for ``ARCH:random``, draw the weights from this seed (without touching the global random
    state) so that every load gives the same model; None draws from the global state (a trainer seeds it)."""
    import open_clip

    ensure_registered()
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    meta = None
    kwargs = {"aug_cfg": aug_cfg} if aug_cfg else {}
    quiet = _QuietRandomInit()
    logging.getLogger().addFilter(quiet)
    try:
        if spec.kind in ("builtin", "checkpoint"):
            path = _checkpoint_file(spec.path)
            meta = ckpt.read_meta(path)
            if meta is None:
                raise CheckpointError(
                    f"{path}: not a clipdex checkpoint (no config inside); name its architecture: ARCH:{path}")
            arch = register_config(meta.arch, meta.model_config)
            model, pre_train, pre = open_clip.create_model_and_transforms(arch, **kwargs)
            ckpt.load_into(model, path)
        elif spec.kind in ("random", "arch_file"):
            arch = spec.arch
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                model, pre_train, pre = open_clip.create_model_and_transforms(arch, **kwargs)
            if spec.kind == "arch_file":
                ckpt.load_into(model, spec.path)
        elif spec.kind == "pretrained":
            arch = spec.arch
            model, pre_train, pre = open_clip.create_model_and_transforms(arch, pretrained=spec.tag, **kwargs)
        elif spec.kind == "hf_hub":
            arch = f"hf-hub:{spec.hub_id}"
            model, pre_train, pre = open_clip.create_model_and_transforms(arch, **kwargs)
        else:  # pragma: no cover - parse_model_spec returns only the kinds above
            raise ModelSpecError(f"unhandled spec kind {spec.kind}")
    except (RuntimeError, OSError) as e:
        if isinstance(e, CheckpointError):
            raise
        where = "the model hub" if spec.kind in ("pretrained", "hf_hub") else "disk"
        raise CheckpointError(
            f"could not load {spec.text!r} from {where}: {e}. Pretrained weights need internet access the "
            "first time (then they are cached); offline, use a local checkpoint file instead."
        ) from e
    finally:
        logging.getLogger().removeFilter(quiet)
    tokenizer = open_clip.get_tokenizer(arch)
    model.eval()
    return LoadedModel(model=model, preprocess_train=pre_train, preprocess=pre, tokenizer=tokenizer,
                       arch=arch, spec=spec, meta=meta)


def _checkpoint_file(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "clipdex-world.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: a folder with no model.safetensors in it")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


RUNTIMES = ("torch", "onnx", "auto")


def onnx_towers(runtime: str, *, device: str, precision: str = "auto") -> tuple[str, ...]:
    """The towers a ``--runtime`` choice loads in ONNX Runtime: none for ``torch``, both for ``onnx`` (which needs
    the CPU) and for ``auto`` on the CPU when ONNX Runtime is installed (none elsewhere; :class:`DualEncoder` then
    keeps the image tower in PyTorch where that measured faster). ``precision`` ``int8`` (CPU, ``onnx`` or
    ``auto``): the text tower and the int8 image tower."""
    from clipdex.retrieval.models import onnx_runtime

    device = str(device)
    if runtime not in RUNTIMES:
        raise ModelSpecError(f"runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if precision == "int8":
        if runtime == "torch" or device != "cpu" or not onnx_runtime.available():
            raise ModelSpecError("--precision int8 runs the image tower in ONNX Runtime on the CPU: use it with "
                                 f"--runtime auto or onnx and --device cpu (got runtime {runtime}, device {device})")
        return ("text", onnx_runtime.INT8_IMAGE)
    if runtime == "auto":
        return onnx_runtime.TOWERS if device == "cpu" and onnx_runtime.available() else ()
    if runtime == "onnx" and device != "cpu":
        raise ModelSpecError(f"--runtime onnx runs on the CPU; the device is {device} (use --runtime torch there)")
    return onnx_runtime.TOWERS if runtime == "onnx" else ()


class DualEncoder:
    """Embeds images and texts into one space; every output row is L2-normalised float32.

    ``runtime``: ``torch`` runs the towers in PyTorch; ``onnx`` in ONNX Runtime from an export of these weights
    (:mod:`clipdex.retrieval.models.onnx_runtime`: made once, cached, checked against PyTorch fp32);
    ``auto`` runs the text tower in ONNX Runtime on the CPU when it is installed (which makes the text export a cold
    search runs without PyTorch), and the image tower in whichever of ONNX Runtime and PyTorch measured faster on
    this machine (:func:`~clipdex.retrieval.models.onnx_export.faster_image_runtime`, once per machine); on a GPU,
    PyTorch. The matcher's token features (:meth:`text_query`, :meth:`text_states`) always come from PyTorch."""

    def __init__(self, loaded: LoadedModel, *, device: str = "auto", precision: str = "auto", runtime: str = "torch"):
        self.device = resolve_device(device)
        self.precision = precision
        self.loaded = loaded
        self.model = loaded.model.to(self.device).eval()
        self.preprocess = loaded.preprocess
        self.tokenizer = loaded.tokenizer
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(self.model.visual, "image_size", 224))
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.info = EncoderInfo(
            spec=loaded.spec.text,
            arch=loaded.arch,
            embed_dim=int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection")
            and isinstance(self.model.text_projection, torch.Tensor) else int(self._probe_dim()),
            image_size=int(size),
            context_length=int(getattr(self.model, "context_length", 77)),
            mean=tuple(float(x) for x in cfg.get("mean", ())),
            std=tuple(float(x) for x in cfg.get("std", ())),
            weights=weights_fingerprint(self.model),
        )
        if self.device.type == "cuda":  # the patch embedding's convolution runs faster on NHWC tensors there
            self.model.visual.to(memory_format=torch.channels_last)
        towers = onnx_towers(runtime, device=self.device, precision=precision)
        self.onnx = None
        if towers:
            from clipdex.retrieval.models.onnx_export import faster_image_runtime, load_towers

            if runtime == "auto" and precision != "int8":
                self.onnx = self._auto_towers(towers)
                if self.onnx is not None and self.onnx.image is not None and faster_image_runtime(self, self.onnx) == "torch":
                    self.onnx.image = None  # PyTorch measured faster for images on this machine
            else:
                self.onnx = load_towers(self, threads=torch.get_num_threads(), towers=towers)
        if self.onnx is None:
            self.runtime = "torch"
        elif self.onnx.image is None:
            self.runtime = "onnx text, torch images"
        else:
            self.runtime = "onnx, int8 images" if precision == "int8" else "onnx"
        # what the image tower computes in: int8 (the quantised export) or fp32 (PyTorch or an fp32 export; a GPU's
        # bf16 autocast is counted with fp32, as before int8 existed): a collection holds vectors of one kind
        self.image_precision = "int8" if precision == "int8" else "fp32"

    def _auto_towers(self, towers: tuple[str, ...]):
        """``--runtime auto``'s ONNX towers: ``towers``, else the text tower alone, else none (PyTorch), with a
        warning naming what could not be exported or checked: auto never fails where PyTorch runs."""
        from clipdex.exceptions import ClipdexError
        from clipdex.retrieval.models.onnx_export import load_towers

        for attempt in (towers, ("text",)):
            try:
                return load_towers(self, threads=torch.get_num_threads(), towers=attempt)
            except ClipdexError as e:
                logger.warning("--runtime auto: %s; running %s in PyTorch", e,
                               "the image tower" if attempt == towers and len(towers) > 1 else "both towers")
        return None

    @property
    def context_length(self) -> int:
        """Tokens the text tower reads, start and end markers included; a longer text is cut to this."""
        return int(getattr(self.tokenizer, "context_length", None) or self.info.context_length)

    def token_count(self, text: str) -> int | None:
        """Tokens ``text`` takes before it is cut to :attr:`context_length`, start and end markers included;
        None when the tokenizer cannot say (open_clip's CLIP and Hugging Face tokenizers can)."""
        from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

        tok = self.tokenizer
        if isinstance(tok, SimpleTokenizer) and tok.reduction_fn is None:
            return len(tok.encode(text)) + 2  # [start] + BPE tokens + [end], as open_clip's __call__ builds it
        if isinstance(tok, HFTokenizer):
            return len(tok.tokenizer(tok.clean_fn(text))["input_ids"])
        return None

    def _probe_dim(self) -> int:
        with torch.no_grad():
            return self.model.encode_text(self.tokenizer(["a"]).to(self.device)).shape[-1]

    @torch.no_grad()
    def encode_image_tensors(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed a preprocessed batch (B, 3, H, W); returns (B, D) normalised, on the model's device."""
        if self.onnx is not None and self.onnx.image is not None:
            feats, _ = self.onnx.encode_image(pixels.numpy())
            return F.normalize(torch.from_numpy(feats), dim=-1)
        with autocast(self.device, self.precision):
            feats = self.model.encode_image(self._on_device(pixels))
        return F.normalize(feats.float(), dim=-1)

    def _on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels on the model's device (a copy that does not wait, from pinned memory), channels-last on CUDA to
        match the image tower there; on the CPU, as given."""
        pixels = pixels.to(self.device, non_blocking=True)
        return pixels.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else pixels

    @property
    def has_grid(self) -> bool:
        """Whether this encoder can give patch-token grids (:func:`image_tokens`) for a matcher to read."""
        return has_token_grid(self.model)

    @torch.no_grad()
    def encode_image_grid_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A preprocessed batch's normalised embeddings (B, D) and patch-token grids (B, cells, width) in
        fp16, from one forward pass; both on the CPU."""
        if self.onnx is not None and self.onnx.image is not None and self.onnx.grid:
            feats, grid = self.onnx.encode_image(pixels.numpy())
            return F.normalize(torch.from_numpy(feats), dim=-1), torch.from_numpy(grid).half()
        with autocast(self.device, self.precision):
            pooled, grid = image_tokens(self.model, self._on_device(pixels))
        return F.normalize(pooled.float(), dim=-1).cpu(), grid.half().cpu()

    @torch.no_grad()
    def text_query(self, text: str) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """One text query's normalised embedding (D,) (as :meth:`encode_texts` gives it) and its token
        features (1, n, 2 * width) with their mask (as :meth:`text_states`), from one pass of the text tower:
        what a re-ranked search needs, for the price of one."""
        tokens = self.tokenizer([text]).to(self.device)
        with autocast(self.device, self.precision):
            x, mask = text_tokens(self.model, tokens)
            pooled = pooled_text(self.model, x, tokens)
        emb = F.normalize(pooled.float(), dim=-1).cpu().numpy()[0]
        return emb, x.float().cpu(), mask.cpu()

    @torch.no_grad()
    def text_states(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The text tower's token features of ``texts`` (T, n, 2 * width) float32 and their (T, n) mask, on the CPU
        (see :func:`text_tokens`): what a matcher reads of a query."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with autocast(self.device, self.precision):
            x, mask = text_tokens_by_length(self.model, tokens)
        return x.float().cpu(), mask.cpu()

    @torch.no_grad()
    def encode_images(self, images: Sequence, *, batch_size: int = 256) -> np.ndarray:
        """Embed PIL images (preprocessed here with open_clip's eval transform); returns (N, D) float32."""
        out = []
        for i in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[i:i + batch_size]])
            out.append(self.encode_image_tensors(batch).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.info.embed_dim), np.float32)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
        """Embed texts with open_clip's tokenizer; returns (N, D) float32, L2-normalised. Texts go in batches of
        similar length (each trimmed to its longest text); ``batch_size`` None: 512 on a GPU, 32 on the CPU,
        where every padded token costs its full time (320 captions of 31 tokens on average, up to 75: 2.9 s in
        one batch, 1.1 s in batches of 32)."""
        if not len(texts):
            return np.zeros((0, self.info.embed_dim), np.float32)
        if batch_size is None:
            batch_size = 32 if self.device.type == "cpu" else 512
        tokens = self.tokenizer(list(texts))
        order = torch.argsort(tokens.argmax(dim=-1), stable=True)  # similar lengths share a batch: less padding
        out = np.zeros((len(texts), self.info.embed_dim), np.float32)
        for i in range(0, len(texts), batch_size):
            idx = order[i:i + batch_size]
            if self.onnx is not None and self.onnx.text is not None:  # numpy throughout: a query is one short
                feats = self.onnx.encode_text(tokens[idx].numpy())    # pass, where torch's per-call cost shows
                out[idx.numpy()] = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
            else:
                with autocast(self.device, self.precision):
                    feats = encode_text_trimmed(self.model, tokens[idx].to(self.device))
                out[idx.numpy()] = F.normalize(feats.float(), dim=-1).cpu().numpy()
        return out


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` computed only up to the batch's longest caption, when that gives the same result.

    In open_clip's CLIP text tower the attention is causal and the feature is read at the end-of-text token
    (``argmax`` pooling), so the padding after it cannot change the output: trimming it away is exact and
    makes short captions several times cheaper (a 15-token caption in a 77-token context). Any other model
    goes through ``encode_text`` unchanged.
    """
    if not trims_text(model):
        return model.encode_text(tokens)
    n = int(tokens.argmax(dim=-1).max()) + 1  # position of the last end-of-text token, plus one
    if n >= tokens.shape[1]:
        return model.encode_text(tokens)
    return encode_trimmed_tokens(model, tokens[:, :n])


def trims_text(model: torch.nn.Module) -> bool:
    """Whether ``model``'s text tower is open_clip's CLIP with causal attention and end-of-text pooling, whose
    padding after the last end-of-text token cannot change the output (see :func:`encode_text_trimmed`)."""
    from open_clip.model import CLIP

    return type(model) is CLIP and model.text_pool_type == "argmax" and model.attn_mask is not None


def encode_trimmed_tokens(model: torch.nn.Module, text: torch.Tensor) -> torch.Tensor:
    """The text embeddings of token ids already cut to the batch's longest caption (B, n), for a model that
    :func:`trims_text`; the length is read from the shape (so an ONNX export keeps it dynamic)."""
    from open_clip.model import text_global_pool

    n = text.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype)  # (B, n, C)
    x = x + model.positional_embedding[:n].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, text, "argmax")  # (B, C)
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection if model.text_projection is not None else x


def load_encoder(spec: str | ModelSpec = "clipdex-world", *, device: str = "auto", precision: str = "auto",
                 runtime: str = "torch") -> DualEncoder:
    """Load the model a spec names (see :mod:`clipdex.retrieval.models.spec`) ready for inference, its towers
    run by ``runtime`` (see :class:`DualEncoder`). An ``ARCH:random`` spec gives the same weights on every load
    (seed :data:`RANDOM_INIT_SEED`), so a collection indexed with it can be searched with it."""
    return DualEncoder(build_model(spec, seed=RANDOM_INIT_SEED), device=device, precision=precision, runtime=runtime)


GRID_SIDE = 4  # the stored patch-token grid is GRID_SIDE x GRID_SIDE cells (the image tower's tokens averaged)


def has_token_grid(model: torch.nn.Module) -> bool:
    """Whether ``model``'s image tower is an open_clip VisionTransformer with a square patch grid, the kind
    :func:`image_tokens` can read patch tokens from."""
    from open_clip.transformer import VisionTransformer

    v = getattr(model, "visual", None)
    return type(v) is VisionTransformer and v.attn_pool is None and v.pool_type == "tok"


def image_tokens(model: torch.nn.Module, pixels: torch.Tensor, *, side: int = GRID_SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """The image tower's pooled embedding (B, D), unnormalised, exactly as ``model.encode_image`` gives it, and
    its final patch tokens (after ``ln_post``) averaged to a ``side`` x ``side`` grid: (B, side * side, width),
    row-major from the top left. One forward pass gives both."""
    v = model.visual
    x = v.transformer(v._embeds(pixels))
    pooled, tokens = v._pool(x)
    if v.proj is not None:
        pooled = pooled @ v.proj
    _, n, w = tokens.shape
    g = int(round(int(n) ** 0.5))  # int(): a constant when traced for export (the patch count is fixed)
    grid = tokens.transpose(1, 2).reshape(-1, int(w), g, g)
    # the same average when the patches divide evenly into cells, in a form the ONNX exporter can write
    grid = F.avg_pool2d(grid, g // side) if g % side == 0 else F.adaptive_avg_pool2d(grid, side)
    grid = grid.reshape(-1, int(w), side * side).transpose(1, 2)
    return pooled, grid


def text_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a matcher reads of each caption, up to the batch's longest: (B, n, 2 * width), the text tower's
    final hidden states (after ``ln_final``, before the projection) then the token embeddings they started
    from, and a (B, n) bool mask that is True on each caption's own tokens (start to end-of-text). The
    embeddings are there because a contrastively trained tower's final states keep little of which spatial
    word stood where (clipdex-world: "left" vs "right" in the same caption, cosine 0.985 after the last
    layer, 0.46 as embeddings). Needs open_clip's CLIP with causal attention and end-of-text pooling."""
    if not trims_text(model):
        raise ModelSpecError("patch-token re-ranking needs an open_clip CLIP text tower (causal, end-of-text pooled)")
    eot = tokens.argmax(dim=-1)
    n = int(eot.max()) + 1
    text = tokens[:, :n]
    cast_dtype = model.transformer.get_cast_dtype()
    emb = model.token_embedding(text).to(cast_dtype)
    x = emb + model.positional_embedding[:n].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = torch.cat([x, emb], dim=-1)
    mask = torch.arange(n, device=tokens.device)[None, :] <= eot[:, None]
    return x, mask


def pooled_text(model: torch.nn.Module, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The unnormalised text embeddings (B, D) that ``model.encode_text`` gives, read from :func:`text_tokens`'
    features (B, n, 2 * width) of the same ``tokens``: each caption's final state at its end-of-text token,
    projected. So one text-tower pass serves the dual encoder and the matcher."""
    width = model.ln_final.normalized_shape[0]  # the final states; the token embeddings follow them
    eot = tokens.argmax(dim=-1)
    return features[torch.arange(len(tokens), device=features.device), eot, :width] @ model.text_projection


def text_tokens_by_length(model: torch.nn.Module, tokens: torch.Tensor, *, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`text_tokens` of many captions, run in chunks of similar length so that one long caption does
    not pad every other; the same (T, n, width) states and (T, n) mask, in the input order."""
    eot = tokens.argmax(dim=-1)
    n = int(eot.max()) + 1 if len(tokens) else 1
    states = None
    order = torch.argsort(eot.cpu())
    for i in range(0, len(order), chunk):
        idx = order[i:i + chunk].to(tokens.device)
        x, _ = text_tokens(model, tokens[idx])
        if states is None:
            states = torch.zeros((len(tokens), n, x.shape[-1]), dtype=x.dtype, device=x.device)
        states[idx, : x.shape[1]] = x
    mask = torch.arange(n, device=tokens.device)[None, :] <= eot[:, None]
    return states, mask
