"""The store and the FAISS accelerator without the CLI: approximate recall against exact, staleness,
glob filters, and the exact text-encoding fast path against open_clip's reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from clipdex.retrieval.store.faiss_index import (
    IndexConfig,
    build_faiss,
    load_for,
    recall_vs_exact,
)
from clipdex.retrieval.store.record import Database
from clipdex.retrieval.store.search import SearchCollection, glob_to_like


def _clustered(n, d=32, centres=50, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_approximate_index_recall_is_measured_against_exact():
    x = _clustered(4000)
    index, factory = build_faiss(x, config=IndexConfig(exact_threshold=1000, nprobe=8))
    assert factory.startswith("IVF")
    r = recall_vs_exact(index, x, sample=200)
    assert 0.8 <= r <= 1.0
    worse, _ = build_faiss(x, config=IndexConfig(exact_threshold=1000, nprobe=1))
    assert recall_vs_exact(worse, x, sample=200) < r  # the trade-off nprobe buys is real
    flat, factory = build_faiss(x, config=IndexConfig())
    assert factory == "Flat" and recall_vs_exact(flat, x, sample=200) == 1.0


@pytest.fixture()
def info():
    from clipdex.retrieval.models.encoder import EncoderInfo

    return EncoderInfo(spec="test", arch="t", embed_dim=32, image_size=8, context_length=77, mean=(0.5,), std=(0.5,))


def _rows(ids, vec, folder="/p"):
    n = len(ids)
    return pa.table({"id": ids, "path": [f"{folder}/{i}.png" for i in ids], "source": ["s"] * n,
                     "content_hash": ["h"] * n, "size": [1] * n, "mtime": [0.0] * n, "width": [8] * n,
                     "height": [8 + k for k in range(n)], "captions": [[] for _ in ids],
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), vec.shape[1])})


def test_stale_index_is_rebuilt_and_filters_match_exact(tmp_path, info):
    col = Database(tmp_path / "db", create=True).open_or_create("c", info=info)
    x = _clustered(300)
    col.append(_rows([f"a{i}" for i in range(200)], x[:200], "/p/one"), None)
    first = load_for(col, "images")
    assert first.sidecar["rows"] == 200 and first.sidecar["lance_version"] == col.versions()["images"]
    col.append(_rows([f"b{i}" for i in range(100)], x[200:], "/p/two"), None)
    again = load_for(col, "images")
    assert again.sidecar["rows"] == 300  # the sidecar no longer matched the table's version: rebuilt
    assert load_for(col, "images").sidecar == again.sidecar  # fresh now: read back, not rebuilt
    s = SearchCollection(col)
    q = x[250]
    hits = s.search_vector(q, k=5)
    exact = np.argsort(-(x @ q))[:5]
    assert [h.id for h in hits] == [f"a{i}" if i < 200 else f"b{i - 200}" for i in exact]
    two = s.search_vector(q, k=5, path_glob="two/*")
    assert all("/p/two/" in h.path for h in two) and len(two) == 5
    tall = s.search_vector(q, k=300, where="height >= 150")
    assert {h.id for h in tall} == {f"a{i}" for i in range(142, 200)}
    np.testing.assert_allclose([h.score for h in two], sorted((x[200:] @ q), reverse=True)[:5], atol=1e-5)


@pytest.mark.parametrize("glob,like", [
    ("*.png", "%.png"),
    ("album-3/*", "%/album-3/%"),
    ("/photos/2024/*", "/photos/2024/%"),
    ("IMG_00?.jpg", "%/IMG\\_00_.jpg"),
    ("it's/*", "%/it''s/%"),
])
def test_glob_to_like(glob, like):
    assert glob_to_like(glob) == like


def test_encoder_mismatch_names_both(tmp_path, info):
    from dataclasses import replace

    from clipdex.exceptions import ModelMismatchError

    db = Database(tmp_path / "db", create=True)
    db.open_or_create("c", info=info)
    with pytest.raises(ModelMismatchError, match="embed_dim: collection has 32, given 64"):
        db.open_or_create("c", info=replace(info, spec="other", embed_dim=64))


def test_trimmed_text_encoding_equals_open_clip():
    import torch

    from clipdex.retrieval.models.encoder import build_model, encode_text_trimmed

    m = build_model("clipdex-tiny:random")
    tokens = m.tokenizer(["a red circle", "a big blue striped star left of a small green square", "x"])
    with torch.no_grad():
        torch.testing.assert_close(encode_text_trimmed(m.model, tokens), m.model.encode_text(tokens),
                                   atol=1e-5, rtol=1e-5)
    assert int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]  # the fast path was taken


def test_recreated_collection_is_not_served_an_old_index(tmp_path, info):
    db = Database(tmp_path / "db", create=True)
    x = _clustered(10)
    col = db.open_or_create("c", info=info)
    col.append(_rows([f"old{i}" for i in range(5)], x[:5]), None)
    assert load_for(col, "images").columns["id"][0] == "old0"
    db.db.drop_table("c__images")
    db.db.drop_table("c__captions")
    col = db.open_or_create("c", info=info)
    col.append(_rows([f"new{i}" for i in range(5)], x[5:]), None)  # same version number, same row count
    assert load_for(col, "images").columns["id"] == [f"new{i}" for i in range(5)]


def test_orphan_captions_never_reach_the_index(tmp_path, info):
    col = Database(tmp_path / "db", create=True).open_or_create("c", info=info)
    x = _clustered(4)
    caps = pa.table({"id": ["a#0", "ghost#0"], "image_id": ["a", "ghost"], "text": ["t", "u"],
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(x[:2].reshape(-1)), 32)})
    col.append(_rows(["a"], x[2:3]), caps)  # 'ghost' is what a run killed between the two appends leaves
    assert load_for(col, "captions").columns["id"] == ["a#0"]
    assert col.reconcile() == 1 and col.caption_count() == 1


def test_same_name_other_weights_is_refused(tmp_path, info):
    from dataclasses import replace

    from clipdex.exceptions import ModelMismatchError
    from clipdex.retrieval.models.encoder import load_encoder

    db = Database(tmp_path / "db", create=True)
    db.open_or_create("old", info=info)  # a store from before fingerprints: weights ""
    db.open_or_create("old", info=replace(info, weights="abc"))  # still accepted
    db.open_or_create("c", info=replace(info, weights="abc"))
    with pytest.raises(ModelMismatchError, match="other weights"):
        db.open_or_create("c", info=replace(info, weights="def"))
    from clipdex.retrieval.models.encoder import DualEncoder, build_model

    a = load_encoder("clipdex-tiny:random").info
    b = load_encoder("clipdex-tiny:random").info
    assert a == b  # ARCH:random loads the same weights every time: a collection indexed with it can be searched
    torch.manual_seed(1)
    c = DualEncoder(build_model("clipdex-tiny:random"), device="cpu").info  # a trainer's init: its own seed
    assert c.spec == a.spec and c.weights != a.weights
    assert load_encoder("clipdex-world").info.weights == load_encoder("clipdex-world", device="cpu").info.weights
