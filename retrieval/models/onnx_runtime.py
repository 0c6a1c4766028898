"""The encoders' towers exported to ONNX and run by ONNX Runtime on the CPU (``--runtime onnx``): the one
module that talks to ONNX Runtime.

Why: on a small CPU most of a text query's 5 ms in PyTorch is per-operator overhead on tiny matrices
(measured on 2 cores with clipdex-world: 5.0 ms for one caption, 18.9 ms for eight; ONNX Runtime 2.2 and
10.8 ms). Any loaded open_clip model can be exported: the default, open_clip architectures, local
checkpoints. The export is made once and kept in a cache folder keyed by the weights' fingerprint
(``$CLIPDEX_CACHE`` or ``~/.cache/clipdex``, then ``onnx/<arch>-<fingerprint>/``): ``text.onnx``,
``image.onnx`` and ``export.json`` (versions, the graph inputs, and the fidelity measured when it was made).

What is exported:
- text: token ids (B, n) -> the unnormalised embedding (B, D). For open_clip's CLIP (causal attention,
  end-of-text pooling) ``n`` is the batch's longest caption, not the 77-token context (the trimmed path of
  :func:`~clipdex.retrieval.models.encoder.encode_text_trimmed`, exact); any other text tower takes the
  full context.
- image: pixels (B, 3, H, W) -> the unnormalised embedding (B, D), and, for towers with a patch grid, the
  4 x 4 grid of patch tokens (B, 16, width) the store keeps for the matcher, from the same pass.

Fidelity is checked when an export is made and whenever one is loaded from the cache for a model: the
cosine of ONNX Runtime's embeddings to PyTorch fp32 on probe captions and images must be at least
:data:`MIN_COSINE_FP32`, or the export is refused (deleted) and :class:`~clipdex.exceptions.RuntimeChoiceError`
says why.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipdex.exceptions import MissingDependencyError, RuntimeChoiceError

logger = logging.getLogger(__name__)

MIN_COSINE_FP32 = 0.9999  # an fp32 export must give the same embeddings as PyTorch, to float error
OPSET = 18  # what torch's dynamo exporter writes
PROBE_CAPTIONS = ("a red circle left of a blue star", "two small green squares", "a photo",
                  "a large yellow hexagon with stripes in the top right corner of a gray noisy background, "
                  "beside a small purple triangle")


def available() -> bool:
    """Whether ONNX Runtime and the exporter's onnxscript are installed (``pip install 'clipdex[onnx]'``)."""
    from importlib.util import find_spec

    return all(find_spec(m) is not None for m in ("onnxruntime", "onnxscript"))


def cache_root() -> Path:
    """Where exports are kept: ``$CLIPDEX_CACHE/onnx`` or ``~/.cache/clipdex/onnx``."""
    return Path(os.environ.get("CLIPDEX_CACHE") or Path.home() / ".cache" / "clipdex") / "onnx"


def export_folder(info) -> Path:
    """The cache folder of an encoder's export (by architecture and weights fingerprint)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in info.arch)
    return cache_root() / f"{safe}-{info.weights}"


@dataclass
class OnnxTowers:
    """ONNX Runtime sessions of one encoder's two towers."""

    folder: Path
    text: object  # onnxruntime.InferenceSession
    image: object
    trimmed_text: bool  # the text graph takes the batch's longest caption, not the whole context
    grid: bool  # the image graph also gives the patch-token grid
    record: dict

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids (B, context) int64 -> unnormalised embeddings (B, D) float32."""
        if self.trimmed_text:
            tokens = tokens[:, : int(tokens.argmax(axis=-1).max()) + 1]
        return self.text.run(None, {"token_ids": np.ascontiguousarray(tokens, dtype=np.int64)})[0]

    def encode_image(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixels (B, 3, H, W) float32 -> (unnormalised embeddings (B, D), grids (B, cells, width) or None)."""
        out = self.image.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})
        return out[0], (out[1] if self.grid else None)


def _text_module(model):
    """A module computing the text embedding from token ids, trimmed when the tower allows it (see the
    module docstring); (module, trimmed)."""
    import torch

    from clipdex.retrieval.models.encoder import encode_trimmed_tokens, trims_text

    class TrimmedText(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, tokens):
            return encode_trimmed_tokens(self.m, tokens)

    class FullText(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, tokens):
            return self.m.encode_text(tokens)

    if trims_text(model):
        return TrimmedText(model), True
    return FullText(model), False


def _image_module(model, *, grid: bool):
    import torch

    from clipdex.retrieval.models.encoder import image_tokens

    class Image(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixels):
            if grid:
                return image_tokens(self.m, pixels)
            return self.m.encode_image(pixels)

    return Image(model)


def export(encoder, folder: Path) -> None:
    """Export ``encoder``'s towers (fp32, on the CPU) into ``folder`` (written atomically: a folder that
    exists holds a whole export)."""
    import shutil

    import torch

    model = encoder.model.float().cpu().eval()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    text, trimmed = _text_module(model)
    tokens = encoder.tokenizer(list(PROBE_CAPTIONS))
    if trimmed:
        tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
    size = encoder.info.image_size
    pixels = torch.zeros((3, 3, size, size))  # batch 3, not 1 or 2, which the exporter would take for a constant
    grid = encoder.has_grid
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel has no ONNX form; the plain path is exact
    try:
        _export_graphs(text, tokens, _image_module(model, grid=grid), pixels, tmp=tmp, grid=grid, trimmed=trimmed,
                       context=encoder.context_length)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    import onnxruntime


    record = {"arch": encoder.info.arch, "weights": encoder.info.weights, "spec": encoder.info.spec,
              "opset": OPSET, "exporter": "torch.onnx dynamo", "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
              "precision": "fp32", "trimmed_text": trimmed, "grid": grid,
              "export_seconds": round(time.perf_counter() - t0, 2)}
    (tmp / "export.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _export_graphs(text, tokens, image, pixels, *, tmp: Path, grid: bool, trimmed: bool,
                   context: int) -> None:
    """Both graphs through torch's dynamo exporter, with the batch (and the text length) dynamic."""
    import contextlib
    import io
    import warnings

    import torch

    batch = torch.export.Dim("batch")
    text_dims = {0: batch, 1: torch.export.Dim("length", max=context)} if trimmed else {0: batch}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(text, (tokens,), str(tmp / "text.onnx"), input_names=["token_ids"],
                          output_names=["text_features"], dynamic_shapes={"tokens": text_dims},
                          dynamo=True, verbose=False)
        outputs = ["image_features", "patch_grid"] if grid else ["image_features"]
        torch.onnx.export(image, (pixels,), str(tmp / "image.onnx"), input_names=["pixels"], output_names=outputs,
                          dynamic_shapes={"pixels": {0: batch}}, dynamo=True, verbose=False)


def _sessions(folder: Path, *, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    make = lambda name: ort.InferenceSession(str(folder / name), opts, providers=["CPUExecutionProvider"])  # noqa: E731
    return make("text.onnx"), make("image.onnx")


def fidelity(encoder, towers: OnnxTowers) -> dict:
    """Cosine of the exported towers' embeddings to PyTorch fp32 on the probe captions and two synthetic
    images: ``{"text_min", "image_min"}`` (and ``grid_max_abs`` when there is a grid)."""
    import torch

    from clipdex.retrieval.models.encoder import encode_text_trimmed, image_tokens

    model = encoder.model
    tokens = encoder.tokenizer(list(PROBE_CAPTIONS))
    size = encoder.info.image_size
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.standard_normal((2, 3, size, size), dtype=np.float32))
    with torch.no_grad():
        ref_t = encode_text_trimmed(model.float(), tokens.to(encoder.device)).cpu().numpy()
        if towers.grid:
            ref_i, ref_g = (t.cpu().numpy() for t in image_tokens(model, pixels.to(encoder.device)))
        else:
            ref_i, ref_g = model.encode_image(pixels.to(encoder.device)).cpu().numpy(), None
    got_t = towers.encode_text(tokens.numpy())
    got_i, got_g = towers.encode_image(pixels.numpy())
    cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)  # noqa: E731
    out = {"text_min": float(cos(ref_t, got_t).min()), "image_min": float(cos(ref_i, got_i).min())}
    if ref_g is not None:
        out["grid_max_abs"] = float(np.abs(ref_g - got_g).max())
    return out


def load_towers(encoder, *, threads: int = 0) -> OnnxTowers:
    """``encoder``'s towers in ONNX Runtime: from the cache, or exported now; each load checks fidelity
    against PyTorch fp32 (:data:`MIN_COSINE_FP32`). ``threads``: ONNX Runtime's intra-op threads (0: its
    default, every core)."""
    if not available():
        raise MissingDependencyError("--runtime onnx needs ONNX Runtime: pip install 'clipdex[onnx]'")
    folder = export_folder(encoder.info)
    made = False
    if not (folder / "export.json").is_file():
        logger.info("exporting %s to ONNX in %s (once for these weights)", encoder.info.spec, folder)
        try:
            export(encoder, folder)
        except Exception as e:  # noqa: BLE001 - any exporter failure is this model's, said with its name
            raise RuntimeChoiceError(f"cannot export {encoder.info.spec} to ONNX ({type(e).__name__}: {e}); use "
                                     "--runtime torch") from e
        made = True
    record = json.loads((folder / "export.json").read_text())
    text, image = _sessions(folder, threads=threads)
    towers = OnnxTowers(folder, text, image, bool(record["trimmed_text"]), bool(record["grid"]), record)
    check = fidelity(encoder, towers)
    if min(check["text_min"], check["image_min"]) < MIN_COSINE_FP32:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeChoiceError(f"the ONNX export of {encoder.info.spec} gives embeddings at cosine "
                                 f"{min(check['text_min'], check['image_min']):.6f} to PyTorch's (at least "
                                 f"{MIN_COSINE_FP32} needed); it was removed. Use --runtime torch")
    if made:
        record["fidelity"] = check
        (folder / "export.json").write_text(json.dumps(record, indent=1))
    towers.record = record | {"fidelity": check}
    return towers


__all__ = ["MIN_COSINE_FP32", "OnnxTowers", "available", "cache_root", "export", "export_folder", "fidelity",
           "load_towers"]
