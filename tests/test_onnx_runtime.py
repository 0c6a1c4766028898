"""``--runtime onnx|auto``: the encoders' towers exported once into a cache keyed by the weights, run by ONNX Runtime,
with the same embeddings as PyTorch fp32 (cosine >= 0.9999) and the same search results; a cold text search that
runs the exported text tower without importing PyTorch, open_clip or LanceDB."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def onnx_encoder():
    from clipdex.retrieval.models.encoder import load_encoder

    return load_encoder("clipdex-world", device="cpu", runtime="onnx")


def test_the_export_is_cached_by_weights_and_records_its_fidelity(onnx_encoder):
    from clipdex.retrieval.models.encoder import load_encoder
    from clipdex.retrieval.models.onnx_runtime import cache_root, export_folder

    folder = export_folder(onnx_encoder.info)
    assert folder.parent == cache_root() and onnx_encoder.info.weights in folder.name
    record = json.loads((folder / "export.json").read_text())
    text, image = record["towers"]["text"], record["towers"]["image"]
    assert record["precision"] == "fp32" and text["trimmed"] and image["grid"]
    assert min(text["fidelity"]["min_cosine"], image["fidelity"]["min_cosine"]) >= 0.9999
    assert text["tokenizer"]["kind"] == "clip-bpe" and len(text["probe"]["features"]) == 4
    stamp = (folder / "text.onnx").stat().st_mtime_ns
    again = load_encoder("clipdex-world", device="cpu", runtime="onnx")  # from the cache: no second export
    assert (folder / "text.onnx").stat().st_mtime_ns == stamp and again.onnx.image is not None
    auto = load_encoder("clipdex-world", device="cpu", runtime="auto")  # the image tower: the faster, measured once
    measured = json.loads((folder / "export.json").read_text())["auto_image"]
    assert measured["choice"] == ("onnx" if measured["onnx_s"] < measured["torch_s"] else "torch")
    assert auto.runtime == {"onnx": "onnx", "torch": "onnx text, torch images"}[measured["choice"]]
    assert (auto.onnx.image is None) == (measured["choice"] == "torch")


def test_int8_image_tower_stays_close_to_fp32_and_a_collection_keeps_its_precision(shipped_encoder, tiny_world,
                                                                                  tmp_path):
    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.exceptions import ModelMismatchError
    from clipdex.indexer.runner import IndexSettings, run_index
    from clipdex.retrieval.models.encoder import load_encoder
    from clipdex.retrieval.models.images import open_rgb
    from clipdex.retrieval.store.record import Database

    int8 = load_encoder("clipdex-world", device="cpu", runtime="onnx", precision="int8")
    assert int8.runtime == "onnx, int8 images" and int8.image_precision == "int8"
    pairs = load_pairs(tiny_world, split="test")
    pixels = torch.stack([shipped_encoder.preprocess(open_rgb(p)) for p in pairs.paths[:64]])
    cos = (shipped_encoder.encode_image_tensors(pixels) * int8.encode_image_tensors(pixels)).sum(-1)
    assert cos.min() >= 0.99 and cos.mean() >= 0.999, (float(cos.min()), float(cos.mean()))
    db = tmp_path / "db"
    base = dict(source=str(tiny_world), split="corpus", db=str(db), collection="q", device="cpu", grids=False)
    run_index(IndexSettings(**base, precision="int8"), progress=False, encoder=int8)
    assert Database(db).open("q").image_precision() == "int8"
    with pytest.raises(ModelMismatchError, match="int8 image tower"):  # fp32 vectors are not mixed in
        run_index(IndexSettings(**base, rehash=True), progress=False, encoder=shipped_encoder)


def test_embeddings_match_pytorch_on_world_captions_and_images(onnx_encoder, shipped_encoder, tiny_world):
    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.retrieval.models.images import open_rgb
    from clipdex.retrieval.models.onnx_runtime import load_text_encoder

    pairs = load_pairs(tiny_world, split="test")
    texts = [c for caps in pairs.captions[:40] for c in caps[:2]]  # 80 captions of every length the world writes
    a, b = shipped_encoder.encode_texts(texts), onnx_encoder.encode_texts(texts)
    assert (a * b).sum(-1).min() >= 0.9999
    c = load_text_encoder(shipped_encoder.info).encode_texts(texts)  # the torch-free query path
    assert (a * c).sum(-1).min() >= 0.9999
    pixels = torch.stack([shipped_encoder.preprocess(open_rgb(p)) for p in pairs.paths[:32]])
    ia, ga = shipped_encoder.encode_image_grid_tensors(pixels)
    ib, gb = onnx_encoder.encode_image_grid_tensors(pixels)
    assert (ia * ib).sum(-1).min() >= 0.9999
    assert torch.allclose(ga.float(), gb.float(), atol=2e-2)  # fp16 grids: one rounding step apart at most
    assert (shipped_encoder.encode_image_tensors(pixels) * onnx_encoder.encode_image_tensors(pixels)).sum(-1).min() >= 0.9999


COLD_SEARCH = """
import json, sys
from clipdex.cli import main
code = main(["search", sys.argv[1], "--db", sys.argv[2], "--collection", "world", "--json"])
heavy = sorted(m for m in ("torch", "open_clip", "lancedb") if m in sys.modules)
print(json.dumps({"code": code, "imported": heavy}), file=sys.stderr)
"""


def _cold_search(query: str, db: str) -> tuple[dict, dict]:
    p = subprocess.run([sys.executable, "-c", COLD_SEARCH, query, db], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), json.loads(p.stderr.strip().splitlines()[-1])


def test_a_cold_search_runs_the_text_export_without_torch_and_finds_the_same(world_db):
    db = str(world_db[0])  # indexed with --runtime auto: the text export is in the cache
    for query in ("a red circle left of a blue star", "two small green squares"):
        torch_hits = json.loads(run_cli("search", query, "--db", db, "--collection", "world", "--json",
                                        "--runtime", "torch").stdout)
        cold, seen = _cold_search(query, db)
        assert seen == {"code": 0, "imported": []}  # no PyTorch, open_clip or LanceDB in the process
        assert [h["id"] for h in cold["results"]] == [h["id"] for h in torch_hits["results"]]
        assert np.allclose([h["score"] for h in cold["results"]], [h["score"] for h in torch_hits["results"]],
                           atol=1e-4)
        onnx_hits = json.loads(run_cli("search", query, "--db", db, "--collection", "world", "--json",
                                       "--runtime", "onnx").stdout)
        assert [h["id"] for h in onnx_hits["results"]] == [h["id"] for h in torch_hits["results"]]


def test_an_export_that_does_not_check_out_gives_way_to_pytorch(shipped_encoder, world_db, tmp_path, monkeypatch,
                                                                caplog):
    import shutil

    from clipdex.retrieval.models.onnx_runtime import export_folder, load_text_encoder

    made = export_folder(shipped_encoder.info)  # in the session's cache: the world's index made it
    assert load_text_encoder(shipped_encoder.info) is not None
    monkeypatch.setenv("CLIPDEX_CACHE", str(tmp_path))
    assert load_text_encoder(shipped_encoder.info) is None  # no export in this cache: PyTorch embeds the query
    shutil.copytree(made, export_folder(shipped_encoder.info))
    assert load_text_encoder(shipped_encoder.info) is not None
    record_file = export_folder(shipped_encoder.info) / "export.json"
    record = json.loads(record_file.read_text())
    record["towers"]["text"]["probe"]["features"][0] = [-x for x in record["towers"]["text"]["probe"]["features"][0]]
    record_file.write_text(json.dumps(record))
    assert load_text_encoder(shipped_encoder.info) is None and "cosine" in caplog.text
    (export_folder(shipped_encoder.info) / "text.onnx").write_bytes(b"not a graph")
    assert load_text_encoder(shipped_encoder.info) is None and "cannot use" in caplog.text


def test_runtime_choice():
    from clipdex.commands.argtypes import RUNTIMES
    from clipdex.exceptions import ModelSpecError
    from clipdex.retrieval.models import encoder

    assert RUNTIMES == encoder.RUNTIMES  # the CLI's copy (it imports no torch)
    assert encoder.onnx_towers("auto", device="cpu") == ("text", "image")  # installed with clipdex
    assert encoder.onnx_towers("auto", device="cpu", precision="int8") == ("text", "image-int8")
    with pytest.raises(ModelSpecError, match="int8"):
        encoder.onnx_towers("torch", device="cpu", precision="int8")
    assert encoder.onnx_towers("onnx", device="cpu") == ("text", "image")
    assert encoder.onnx_towers("auto", device="cuda") == ()
    with pytest.raises(ModelSpecError, match="runs on the CPU"):
        encoder.onnx_towers("onnx", device="cuda:0")
    with pytest.raises(ModelSpecError, match="use one of"):
        encoder.onnx_towers("tensorrt", device="cpu")


def test_auto_falls_back_to_pytorch_for_a_tower_that_cannot_be_exported(tmp_path, monkeypatch, caplog):
    from clipdex.retrieval.models import onnx_export
    from clipdex.retrieval.models.encoder import load_encoder

    monkeypatch.setenv("CLIPDEX_CACHE", str(tmp_path))
    real = onnx_export._export_tower

    def no_image(encoder, folder, tower):
        if tower == "image":
            raise RuntimeError("this exporter cannot write the image tower")
        return real(encoder, folder, tower)

    monkeypatch.setattr(onnx_export, "_export_tower", no_image)
    enc = load_encoder("clipdex-tiny:random", device="cpu", runtime="auto")
    assert enc.runtime == "onnx text, torch images" and "cannot write the image tower" in caplog.text
    with pytest.raises(Exception, match="cannot export"):  # asked for by name: an error, not a fallback
        load_encoder("clipdex-tiny:random", device="cpu", runtime="onnx")


def test_an_unwritable_export_cache_is_a_clear_error_and_auto_runs_pytorch(tmp_path, monkeypatch, caplog):
    from clipdex.exceptions import RuntimeChoiceError
    from clipdex.retrieval.models.encoder import load_encoder

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("CLIPDEX_CACHE", str(blocker))  # onnx/ cannot be made under a file
    with pytest.raises(RuntimeChoiceError, match="cannot write the ONNX export cache .*CLIPDEX_CACHE"):
        load_encoder("clipdex-tiny:random", device="cpu", runtime="onnx")
    enc = load_encoder("clipdex-tiny:random", device="cpu", runtime="auto")
    assert enc.runtime == "torch" and "cannot write the ONNX export cache" in caplog.text
