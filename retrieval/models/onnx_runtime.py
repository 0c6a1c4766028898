"""The encoders' towers exported to ONNX and run by ONNX Runtime on the CPU (``--runtime onnx|auto``): the export
cache, its records, the sessions, and the text export run with no PyTorch (the exporting itself is
:mod:`clipdex.retrieval.models.onnx_export`; these two modules are the only ones that talk to ONNX Runtime).

Why: on a small CPU most of a text query's 5 ms in PyTorch is per-operator overhead on tiny matrices
(measured on 2 cores with clipdex-world: 5.0 ms for one caption, 18.9 ms for eight; ONNX Runtime 2.2 and
10.8 ms), and a cold ``clipdex search`` that needs PyTorch and open_clip only to embed its query spends 3 s
importing them. Any loaded open_clip model can be exported: the default, open_clip architectures, local
checkpoints. Each tower is exported once, when first asked for, into a cache folder keyed by the weights'
fingerprint (``$CLIPDEX_CACHE`` or ``~/.cache/clipdex``, then ``onnx/<arch>-<fingerprint>/``): ``text.onnx``,
``image.onnx`` (each with its ``.data`` file of weights), ``merges.txt.gz`` (the tokenizer's) and
``export.json``, the commit point: a tower is in the cache only once the record lists it.

What is exported:
- text: token ids (B, n) -> the unnormalised embedding (B, D). For open_clip's CLIP (causal attention,
  end-of-text pooling) ``n`` is the batch's longest caption, not the 77-token context (the trimmed path of
  :func:`~clipdex.retrieval.models.encoder.encode_text_trimmed`, exact); any other text tower takes the
  full context. When the model's tokenizer is CLIP's BPE, the record keeps what :class:`ExportedTextEncoder`
  needs to embed a query with no PyTorch at all (:mod:`clipdex.retrieval.models.bpe`), and the probe captions'
  token ids and PyTorch fp32 embeddings to check itself against.
- image: pixels (B, 3, H, W) -> the unnormalised embedding (B, D), and, for towers with a patch grid, the
  4 x 4 grid of patch tokens (B, 16, width) the store keeps for the matcher, from the same pass.

Fidelity: whenever a tower is loaded for a PyTorch model (:func:`~clipdex.retrieval.models.onnx_export.load_towers`), the cosine of ONNX Runtime's
embeddings to PyTorch fp32 on probe captions and images must be at least :data:`MIN_COSINE_FP32`; a cached
tower that fails is exported again, a fresh one that fails is refused with
:class:`~clipdex.exceptions.RuntimeChoiceError`. :func:`load_text_encoder` (no PyTorch) checks the text tower
against the embeddings PyTorch gave the probe captions at export time, and gives way to PyTorch (returns None)
when it cannot vouch for it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from clipdex.exceptions import MissingDependencyError

logger = logging.getLogger(__name__)

MIN_COSINE_FP32 = 0.9999  # an fp32 export must give the same embeddings as PyTorch, to float error
MIN_COSINE_INT8 = 0.99  # an int8 image tower: each probe image's embedding at least this close to PyTorch fp32's
OPSET = 18  # what torch's dynamo exporter writes
FORMAT = 2  # of export.json: 2 records each tower on its own (1, one record for both, is exported again)
TOWERS = ("text", "image")
INT8_IMAGE = "image-int8"  # the image tower with int8 weights (dynamic quantisation of the fp32 export)
PROBE_CAPTIONS = ("a red circle left of a blue star", "two small green squares", "a photo",
                  "a large yellow hexagon with stripes in the top right corner of a gray noisy background, "
                  "beside a small purple triangle")
MERGES_FILE = "merges.txt.gz"


def available() -> bool:
    """Whether ONNX Runtime and the exporter's onnxscript are installed (they come with clipdex)."""
    return all(find_spec(m) is not None for m in ("onnxruntime", "onnxscript"))


def cache_root() -> Path:
    """Where exports are kept: ``$CLIPDEX_CACHE/onnx`` or ``~/.cache/clipdex/onnx``."""
    return Path(os.environ.get("CLIPDEX_CACHE") or Path.home() / ".cache" / "clipdex") / "onnx"


def export_folder(info) -> Path:
    """The cache folder of an encoder's export (by architecture and weights fingerprint)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in info.arch)
    return cache_root() / f"{safe}-{info.weights}"


def open_clip_merges_file() -> Path:
    """open_clip's CLIP BPE merges file, found without importing open_clip (which imports torch)."""
    spec = find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("open_clip is not installed: pip install open-clip-torch")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def read_record(folder: Path, info) -> dict | None:
    """The export record of ``folder`` if it is one of this format for ``info``'s architecture and weights."""
    try:
        record = json.loads((folder / "export.json").read_text())
    except (OSError, ValueError):
        return None
    if (record.get("format") != FORMAT or record.get("weights") != info.weights or record.get("arch") != info.arch
            or not isinstance(record.get("towers"), dict)):
        return None
    return record


def _session(path: Path, *, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _trim(tokens: np.ndarray) -> np.ndarray:
    """Token ids cut after the batch's last end-of-text token (the highest id, so ``argmax`` finds it)."""
    return tokens[:, : int(tokens.argmax(axis=-1).max()) + 1]


@dataclass
class OnnxTowers:
    """ONNX Runtime sessions of one encoder's towers (None for a tower not loaded)."""

    folder: Path
    text: object | None  # onnxruntime.InferenceSession
    image: object | None
    trimmed_text: bool  # the text graph takes the batch's longest caption, not the whole context
    grid: bool  # the image graph also gives the patch-token grid
    record: dict

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids (B, context) int64 -> unnormalised embeddings (B, D) float32."""
        if self.trimmed_text:
            tokens = _trim(tokens)
        return self.text.run(None, {"token_ids": np.ascontiguousarray(tokens, dtype=np.int64)})[0]

    def encode_image(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixels (B, 3, H, W) float32 -> (unnormalised embeddings (B, D), grids (B, cells, width) or None)."""
        out = self.image.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})
        return out[0], (out[1] if self.grid else None)


class ExportedTextEncoder:
    """A text tower exported with CLIP's BPE tokenizer, run with no PyTorch or open_clip: what a cold search
    embeds its query with (:meth:`SearchCollection.text_encoder`). The same embeddings as the PyTorch tower, to
    :data:`MIN_COSINE_FP32`; ``info`` is the collection's encoder record, whose weights the export was made from."""

    runtime = "onnx"

    def __init__(self, info, session, tokenizer, *, trimmed: bool, folder: Path):
        self.info = info
        self.session = session
        self.tokenizer = tokenizer
        self.trimmed = trimmed
        self.folder = folder

    @property
    def context_length(self) -> int:
        """Tokens the text tower reads, start and end markers included; a longer text is cut to this."""
        return self.tokenizer.context_length

    def token_count(self, text: str) -> int:
        """Tokens ``text`` takes before it is cut to :attr:`context_length`, start and end markers included."""
        return self.tokenizer.token_count(text)

    def _run(self, tokens: np.ndarray) -> np.ndarray:
        tokens = _trim(tokens) if self.trimmed else tokens
        return self.session.run(None, {"token_ids": np.ascontiguousarray(tokens, dtype=np.int64)})[0]

    def encode_texts(self, texts, *, batch_size: int = 32) -> np.ndarray:
        """Embed texts; (N, D) float32, L2-normalised, in batches of similar length (as ``DualEncoder`` does)."""
        out = np.zeros((len(texts), self.info.embed_dim), np.float32)
        if not len(texts):
            return out
        tokens = self.tokenizer(list(texts))
        order = np.argsort(tokens.argmax(axis=-1), kind="stable")
        for i in range(0, len(texts), batch_size):
            idx = order[i:i + batch_size]
            out[idx] = _normalise(self._run(tokens[idx]))
        return out


def load_text_encoder(info, *, threads: int = 1) -> ExportedTextEncoder | None:
    """The cached text export of ``info``'s weights as an :class:`ExportedTextEncoder`, or None when there is
    none to vouch for: no ONNX Runtime, no export (``clipdex index`` makes one), a tokenizer other than CLIP's
    BPE, or a check that fails (the probe captions' token ids, or their embeddings at cosine below
    :data:`MIN_COSINE_FP32` to what PyTorch gave at export time). Imports no PyTorch."""
    if find_spec("onnxruntime") is None:
        return None
    folder = export_folder(info)
    record = read_record(folder, info)
    text = (record or {}).get("towers", {}).get("text")
    if not text or not text.get("tokenizer"):
        return None
    from clipdex.retrieval.models.bpe import ClipBpeTokenizer

    try:
        tok = ClipBpeTokenizer(folder / MERGES_FILE, context_length=int(text["tokenizer"]["context_length"]))
        probe = text["probe"]
        tokens = tok(probe["captions"])
        if not np.array_equal(tokens, np.asarray(probe["tokens"], np.int64)):
            logger.warning("%s: the tokenizer does not give the probe captions' recorded ids; embedding queries "
                           "with PyTorch", folder)
            return None
        encoder = ExportedTextEncoder(info, _session(folder / text["file"], threads=threads), tok,
                                      trimmed=bool(text["trimmed"]), folder=folder)
        cos = float((_normalise(encoder._run(tokens)) * np.asarray(probe["features"], np.float32)).sum(-1).min())
    except Exception as e:  # noqa: BLE001 - a damaged cache only costs the fast path, said once
        logger.warning("cannot use the ONNX text export in %s (%s: %s); embedding queries with PyTorch", folder,
                       type(e).__name__, e)
        return None
    if cos < MIN_COSINE_FP32:
        logger.warning("the ONNX text export in %s gives the probe captions cosine %.6f to PyTorch's (at least %s "
                       "needed); embedding queries with PyTorch", folder, cos, MIN_COSINE_FP32)
        return None
    return encoder


__all__ = ["FORMAT", "INT8_IMAGE", "MIN_COSINE_FP32", "MIN_COSINE_INT8", "ExportedTextEncoder", "OnnxTowers", "available", "cache_root",
           "export_folder", "load_text_encoder", "open_clip_merges_file", "read_record"]
