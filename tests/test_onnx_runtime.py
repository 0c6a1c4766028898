"""``--runtime onnx``: the encoders' towers exported once into a cache keyed by the weights, run by ONNX Runtime,
with the same embeddings as PyTorch fp32 (cosine >= 0.9999) and the same search results."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh export cache for this module (CLIPDEX_CACHE), so nothing lands in ~/.cache."""
    import os

    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("CLIPDEX_CACHE")
    os.environ["CLIPDEX_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("CLIPDEX_CACHE")
    else:
        os.environ["CLIPDEX_CACHE"] = old


@pytest.fixture(scope="module")
def onnx_encoder(cache):
    from clipdex.retrieval.models.encoder import load_encoder

    return load_encoder("clipdex-world", device="cpu", runtime="onnx")


def test_the_export_is_cached_by_weights_and_records_its_fidelity(onnx_encoder, cache):
    from clipdex.retrieval.models.encoder import load_encoder
    from clipdex.retrieval.models.onnx_runtime import export_folder

    folder = export_folder(onnx_encoder.info)
    assert folder.parent == cache / "onnx" and onnx_encoder.info.weights in folder.name
    record = json.loads((folder / "export.json").read_text())
    assert record["precision"] == "fp32" and record["trimmed_text"] and record["grid"]
    assert min(record["fidelity"]["text_min"], record["fidelity"]["image_min"]) >= 0.9999
    stamp = (folder / "text.onnx").stat().st_mtime_ns
    again = load_encoder("clipdex-world", device="cpu", runtime="onnx")  # from the cache: no second export
    assert (folder / "text.onnx").stat().st_mtime_ns == stamp and again.onnx is not None


def test_embeddings_match_pytorch_on_world_captions_and_images(onnx_encoder, shipped_encoder, tiny_world):
    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.retrieval.models.images import open_rgb

    pairs = load_pairs(tiny_world, split="test")
    texts = [c for caps in pairs.captions[:40] for c in caps[:2]]  # 80 captions of every length the world writes
    a, b = shipped_encoder.encode_texts(texts), onnx_encoder.encode_texts(texts)
    assert (a * b).sum(-1).min() >= 0.9999
    pixels = torch.stack([shipped_encoder.preprocess(open_rgb(p)) for p in pairs.paths[:32]])
    ia, ga = shipped_encoder.encode_image_grid_tensors(pixels)
    ib, gb = onnx_encoder.encode_image_grid_tensors(pixels)
    assert (ia * ib).sum(-1).min() >= 0.9999
    assert torch.allclose(ga.float(), gb.float(), atol=2e-2)  # fp16 grids: one rounding step apart at most
    assert (shipped_encoder.encode_image_tensors(pixels) * onnx_encoder.encode_image_tensors(pixels)).sum(-1).min() >= 0.9999


def test_search_gives_the_same_results_with_either_runtime(world_db, cache):
    db = str(world_db[0])
    for query in ("a red circle left of a blue star", "two small green squares"):
        torch_hits = json.loads(run_cli("search", query, "--db", db, "--collection", "world", "--json").stdout)
        onnx_hits = json.loads(run_cli("search", query, "--db", db, "--collection", "world", "--json",
                                       "--runtime", "onnx").stdout)
        assert [h["id"] for h in onnx_hits["results"]] == [h["id"] for h in torch_hits["results"]]
        assert np.allclose([h["score"] for h in onnx_hits["results"]], [h["score"] for h in torch_hits["results"]],
                           atol=1e-4)


def test_runtime_choice():
    from clipdex.exceptions import ModelSpecError
    from clipdex.retrieval.models.encoder import resolve_runtime

    assert resolve_runtime("auto", device="cpu") == "onnx"  # installed with the dev extras
    assert resolve_runtime("auto", device="cuda") == "torch"
    with pytest.raises(ModelSpecError, match="runs on the CPU"):
        resolve_runtime("onnx", device="cuda:0")
    with pytest.raises(ModelSpecError, match="use one of"):
        resolve_runtime("tensorrt", device="cpu")
