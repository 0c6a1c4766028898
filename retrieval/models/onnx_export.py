"""Exporting the encoders' towers to ONNX and holding them to PyTorch (needs PyTorch and torch's exporter): the
half of :mod:`clipdex.retrieval.models.onnx_runtime` that a model loaded in PyTorch uses.

- :func:`load_towers`: a model's towers from the cache, each exported once when first asked for (text, image, and
  the int8 image tower quantised from the fp32 one), every load checked against PyTorch fp32
  (:data:`~clipdex.retrieval.models.onnx_runtime.MIN_COSINE_FP32`, ``MIN_COSINE_INT8``); a cached tower that fails
  is exported again, a fresh one that fails is refused with :class:`~clipdex.exceptions.RuntimeChoiceError`.
- :func:`faster_image_runtime`: whether ONNX Runtime or PyTorch runs the image tower faster on this machine
  (``--runtime auto``), measured once and kept in the record.

The cache's layout, the records and the sessions are :mod:`~clipdex.retrieval.models.onnx_runtime`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from clipdex.exceptions import MissingDependencyError, RuntimeChoiceError
from clipdex.files import atomic_write
from clipdex.retrieval.models.onnx_runtime import (
    FORMAT,
    INT8_IMAGE,
    MERGES_FILE,
    MIN_COSINE_FP32,
    MIN_COSINE_INT8,
    OPSET,
    PROBE_CAPTIONS,
    TOWERS,
    OnnxTowers,
    _normalise,
    _session,
    available,
    export_folder,
    open_clip_merges_file,
    read_record,
)

logger = logging.getLogger(__name__)


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


def _bpe_tokenizer_record(encoder) -> dict | None:
    """What :func:`load_text_encoder` needs to tokenize like ``encoder`` without open_clip, or None when its
    tokenizer is not open_clip's plain CLIP BPE (lower-case cleaning, no extra tokens, truncation)."""
    from open_clip.tokenizer import SimpleTokenizer, _clean_lower

    from clipdex.retrieval.models.bpe import ClipBpeTokenizer

    tok = encoder.tokenizer
    if type(tok) is not SimpleTokenizer or tok.reduction_fn is not None or tok.clean_fn is not _clean_lower:
        return None
    ours = ClipBpeTokenizer(open_clip_merges_file(), context_length=encoder.context_length)
    if ours.encoder != tok.encoder or not np.array_equal(ours(list(PROBE_CAPTIONS)),
                                                         tok(list(PROBE_CAPTIONS)).numpy()):
        return None
    return {"kind": "clip-bpe", "file": MERGES_FILE, "context_length": encoder.context_length}


def _export_graph(module, example, *, path: Path, input_name: str, outputs: list[str], dims: dict) -> None:
    """One graph through torch's dynamo exporter into ``path`` (and its ``.data`` file beside it); ``dims``:
    the dynamic dimensions of the module's one input."""
    import inspect
    import io
    import warnings

    import torch

    arg = next(iter(inspect.signature(module.forward).parameters))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel has no ONNX form; the plain path is exact
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=outputs,
                              dynamic_shapes={arg: dims}, dynamo=True, verbose=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _export_tower(encoder, folder: Path, tower: str) -> dict:
    """Export ``tower`` of ``encoder`` (fp32, on the CPU) into ``folder``; its record (not yet written). The
    files are written in a temporary folder and moved in, weights first."""
    import torch

    model = encoder.model.float().cpu().eval()
    tmp = folder / f".{tower}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    batch = torch.export.Dim("batch")
    try:
        if tower == "text":
            module, trimmed = _text_module(model)
            tokens = encoder.tokenizer(list(PROBE_CAPTIONS))
            tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1] if trimmed else tokens
            dims = {0: batch, 1: torch.export.Dim("length", max=encoder.context_length)} if trimmed else {0: batch}
            _export_graph(module, tokens, path=tmp / "text.onnx", input_name="token_ids", outputs=["text_features"],
                          dims=dims)
            record = {"file": "text.onnx", "trimmed": trimmed, "tokenizer": _bpe_tokenizer_record(encoder)}
            if record["tokenizer"]:
                shutil.copyfile(open_clip_merges_file(), tmp / MERGES_FILE)
        elif tower == INT8_IMAGE:
            _quantize(folder / "image.onnx", tmp / "image-int8.onnx")
            record = {"file": "image-int8.onnx", "grid": encoder.has_grid, "precision": "int8",
                      "quantization": "dynamic: int8 weights per channel, activations quantised per batch at run time "
                                      "(onnxruntime.quantization.quantize_dynamic)"}
        else:
            size = encoder.info.image_size
            pixels = torch.zeros((3, 3, size, size))  # batch 3, not 1 or 2, which the exporter takes for a constant
            grid = encoder.has_grid
            _export_graph(_image_module(model, grid=grid), pixels, path=tmp / "image.onnx", input_name="pixels",
                          outputs=["image_features", "patch_grid"] if grid else ["image_features"], dims={0: batch})
            record = {"file": "image.onnx", "grid": grid}
        for f in sorted(tmp.iterdir(), key=lambda p: p.suffix == ".onnx"):  # the graph last: it names its weights
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record["export_seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _quantize(fp32: Path, out: Path) -> None:
    """``fp32``'s weights as int8 (per output channel), activations quantised at run time: the form that needs no
    calibration set and speeds up the image tower's matrix products on a CPU (bench/runtime_speed.py)."""
    import logging as _logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = _logging.getLogger()  # the quantiser logs a warning per graph about pre-processing
    level = quiet.level
    quiet.setLevel(_logging.ERROR)
    try:
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        quiet.setLevel(level)


@contextlib.contextmanager
def _export_lock(folder: Path) -> Iterator[None]:
    """One exporter of a cache folder at a time (two processes asking for the same model wait for one export)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".export.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_record(folder: Path, record: dict) -> None:
    atomic_write(folder / "export.json", lambda p: p.write_text(json.dumps(record, indent=1)))


def _new_record(encoder) -> dict:
    import onnxruntime
    import torch

    return {"format": FORMAT, "arch": encoder.info.arch, "weights": encoder.info.weights, "spec": encoder.info.spec,
            "opset": OPSET, "exporter": "torch.onnx dynamo", "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "precision": "fp32", "towers": {}}


def _probe_pixels(encoder) -> np.ndarray:
    size = encoder.info.image_size
    return np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)


def _text_fidelity(encoder, towers: OnnxTowers) -> tuple[dict, dict]:
    """(the text tower's fidelity, its probe: the captions, their token ids and PyTorch fp32 embeddings)."""
    import torch

    from clipdex.retrieval.models.encoder import encode_text_trimmed

    tokens = encoder.tokenizer(list(PROBE_CAPTIONS))
    with torch.no_grad():
        ref = _normalise(encode_text_trimmed(encoder.model.float(), tokens.to(encoder.device)).cpu().numpy())
    cos = (ref * _normalise(towers.encode_text(tokens.numpy()))).sum(-1)
    probe = {"captions": list(PROBE_CAPTIONS), "tokens": tokens.numpy().tolist(), "features": ref.tolist()}
    return {"min_cosine": float(cos.min())}, probe


def _image_fidelity(encoder, towers: OnnxTowers) -> dict:
    import torch

    from clipdex.retrieval.models.encoder import image_tokens

    pixels = torch.from_numpy(_probe_pixels(encoder)).to(encoder.device)
    with torch.no_grad():
        if towers.grid:
            ref, ref_grid = (t.cpu().numpy() for t in image_tokens(encoder.model, pixels))
        else:
            ref, ref_grid = encoder.model.encode_image(pixels).cpu().numpy(), None
    got, grid = towers.encode_image(pixels.cpu().numpy())
    out = {"min_cosine": float((_normalise(ref) * _normalise(got)).sum(-1).min())}
    if ref_grid is not None:
        out["grid_max_abs"] = float(np.abs(ref_grid - grid).max())
    return out


def _open(encoder, folder: Path, record: dict, towers: tuple[str, ...], *, threads: int) -> OnnxTowers:
    """Sessions of ``towers`` from ``folder``, each checked against PyTorch fp32; the fidelity (and the text
    probe) go into ``record``. Raises RuntimeChoiceError naming the tower that falls short."""
    t = record["towers"]
    image = next((x for x in towers if x != "text"), "image")
    out = OnnxTowers(folder, None, None, bool(t.get("text", {}).get("trimmed")), bool(t.get(image, {}).get("grid")),
                     record)
    for tower in towers:
        session = _session(folder / t[tower]["file"], threads=threads)
        if tower == "text":
            out.text = session
            t["text"]["fidelity"], t["text"]["probe"] = _text_fidelity(encoder, out)
        else:
            out.image = session
            t[tower]["fidelity"] = _image_fidelity(encoder, out)
        cos, need = t[tower]["fidelity"]["min_cosine"], MIN_COSINE_INT8 if tower == INT8_IMAGE else MIN_COSINE_FP32
        if cos < need:
            raise RuntimeChoiceError(f"the ONNX export of {encoder.info.spec}'s {tower} tower gives embeddings at "
                                     f"cosine {cos:.6f} to PyTorch's (at least {need} needed)")
    return out


def faster_image_runtime(encoder, towers: OnnxTowers) -> str:
    """``onnx`` or ``torch``: which ran ``encoder``'s image tower faster on this machine (a batch of 32 probe images,
    best of 3 after a warm-up, the grid path when the tower has one, at this process's thread count). Measured once
    per machine and thread count and kept in the export record (``auto_image``): the answer differs between CPUs
    (clipdex-world on two 2-core machines: ONNX Runtime 0.90x and 1.64x PyTorch)."""
    import platform

    import torch

    from clipdex.retrieval.models.encoder import image_tokens

    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    folder = towers.folder
    known = (read_record(folder, encoder.info) or {}).get("auto_image", {})
    if known.get("machine") == machine:
        return known["choice"]
    size = encoder.info.image_size
    pixels = torch.from_numpy(np.random.default_rng(1).standard_normal((32, 3, size, size), dtype=np.float32))

    def best(run) -> float:
        run()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        model = encoder.model
        torch_s = best(lambda: image_tokens(model, pixels) if towers.grid else model.encode_image(pixels))
    onnx_s = best(lambda: towers.encode_image(pixels.numpy()))
    choice = "onnx" if onnx_s < torch_s else "torch"
    try:
        with _export_lock(folder):
            record = read_record(folder, encoder.info)
            if record is not None:
                record["auto_image"] = {"machine": machine, "choice": choice, "torch_s": round(torch_s, 5),
                                        "onnx_s": round(onnx_s, 5), "batch": 32}
                _write_record(folder, record)
    except OSError as e:  # not kept: measured again next time
        logger.warning("could not record the image runtime choice in %s: %s", folder, e)
    logger.info("image tower on this machine: PyTorch %.1f ms, ONNX Runtime %.1f ms a batch of 32: %s", torch_s * 1e3,
                onnx_s * 1e3, choice)
    return choice


def load_towers(encoder, *, threads: int = 0, towers: tuple[str, ...] = TOWERS) -> OnnxTowers:
    """``encoder``'s ``towers`` in ONNX Runtime: from the cache, or exported now (once per weights); each load
    checks fidelity against PyTorch fp32 (:data:`MIN_COSINE_FP32`), and a cached export that fails it (or cannot
    be read) is made again. ``threads``: ONNX Runtime's intra-op threads (0: its default, every core)."""
    if not available():
        raise MissingDependencyError("--runtime onnx needs ONNX Runtime and onnxscript: pip install onnxruntime "
                                     "onnxscript onnx")
    folder = export_folder(encoder.info)
    record = read_record(folder, encoder.info)
    if record is not None and all(t in record["towers"] for t in towers):
        try:
            return _open(encoder, folder, record, towers, threads=threads)
        except Exception as e:  # noqa: BLE001 - an unreadable or unfaithful export, whatever ONNX Runtime raised
            logger.warning("the cached ONNX export in %s is unusable (%s); exporting it again", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
    try:
        return _export_missing(encoder, folder, towers, threads=threads)
    except OSError as e:  # the cache folder cannot be made or written (read-only home, full disk)
        raise RuntimeChoiceError(f"cannot write the ONNX export cache {folder} ({e.strerror or e}): set CLIPDEX_CACHE "
                                 "to a writable folder, or use --runtime torch") from e


def _export_missing(encoder, folder: Path, towers: tuple[str, ...], *, threads: int) -> OnnxTowers:
    """Under the folder's export lock: export what of ``towers`` the record lacks, open and check them, and write
    the record (the commit point)."""
    with _export_lock(folder):
        record = read_record(folder, encoder.info) or _new_record(encoder)  # another process may have made it
        for tower in (("image", *towers) if INT8_IMAGE in towers else towers):  # int8 is quantised from fp32
            if tower in record["towers"]:
                continue
            logger.info("exporting %s's %s tower to ONNX in %s (once for these weights)", encoder.info.spec, tower,
                        folder)
            try:
                record["towers"][tower] = _export_tower(encoder, folder, tower)
            except Exception as e:  # noqa: BLE001 - any exporter failure is this model's, said with its name
                raise RuntimeChoiceError(f"cannot export {encoder.info.spec}'s {tower} tower to ONNX "
                                         f"({type(e).__name__}: {e}); use --runtime torch") from e
        try:
            opened = _open(encoder, folder, record, towers, threads=threads)
        except Exception as e:  # noqa: BLE001
            shutil.rmtree(folder, ignore_errors=True)
            detail = str(e) if isinstance(e, RuntimeChoiceError) else (
                f"ONNX Runtime cannot run the export of {encoder.info.spec} in {folder} ({type(e).__name__}: {e})")
            raise RuntimeChoiceError(f"{detail}; the export was removed. Use --runtime torch") from e
        _write_record(folder, record)
        return opened


__all__ = ["faster_image_runtime", "load_towers"]
