"""Patch-token grids in the store and re-ranking a text search with the cross-attention matcher: the grids the
indexer stores, old collections without them, the matcher's order, its lookup and refusal, and the CLI."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clipdex.exceptions import ModelMismatchError, StoreError
from conftest import run_cli

LAYOUT = {"side": 4, "cells": 16, "width": 256, "dtype": "float16"}  # clipdex-world's


@pytest.fixture(scope="module")
def world(world_db, tiny_world):
    """The indexed test split, its collection and the clipdex-world encoder (on the CPU, loaded once)."""
    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.retrieval.store.search import open_collection

    db, summary = world_db
    search = open_collection(db, collection="world", device="cpu")
    return SimpleNamespace(db=db, summary=summary, col=search.collection, enc=search.encoder,
                           pairs=load_pairs(tiny_world, split="test"))


def _save_matcher(enc, path, *, weights: str | None = None, seed: int = 0):
    """A real (untrained) matcher for ``enc``'s token widths, drawn from ``seed``, saved at ``path``."""
    from clipdex.retrieval.models.matcher import Matcher, MatcherConfig, save_matcher

    text_dim = enc.text_states(["a"])[0].shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = Matcher(MatcherConfig(image_dim=LAYOUT["width"], text_dim=text_dim, cells=LAYOUT["cells"]))
    save_matcher(m, path, encoder_weights=enc.info.weights if weights is None else weights, record={"test": 1})
    return path


@pytest.fixture(scope="module")
def matcher_file(world, tmp_path_factory):
    return _save_matcher(world.enc, tmp_path_factory.mktemp("matcher") / "world.matcher.safetensors")


def test_grids_are_stored_with_their_layout_and_are_the_encoders(world):
    from clipdex.retrieval.models.images import decode_image

    col, enc = world.col, world.enc
    assert col.grid_layout() == LAYOUT == world.summary["grid"]
    ids = list(reversed(world.pairs.ids[:6]))  # any order asked is the order given
    stored = col.grids(ids)
    assert stored.shape == (6, 16, 256) and stored.dtype == np.float16
    assert len(col.rows(ids[:1], columns=("grid",))["grid"][0].as_py()) == 16 * 256 * 2  # 8 KiB per image
    paths = [world.pairs.paths[world.pairs.ids.index(i)] for i in ids]
    pixels = torch.stack([enc.preprocess(decode_image(p.read_bytes(), max_pixels=10**8,
                                                      draft_size=enc.info.image_size)[0]) for p in paths])
    emb, fresh = enc.encode_image_grid_tensors(pixels)
    s, f = stored.astype(np.float32), fresh.numpy().astype(np.float32)
    cpu = world.summary["device"] == "cpu"  # indexed on a GPU: in bf16, further from this CPU pass
    tol = 2e-3 if cpu else 5e-2
    np.testing.assert_allclose(s, f, rtol=tol, atol=tol)  # the same pass, in fp16 (another batch: float error)
    dist = np.abs(s[:, None] - f[None]).mean(axis=(2, 3))
    assert (dist.argmin(axis=1) == np.arange(6)).all()  # each stored grid is its own image's, not a neighbour's
    vec, rows = col.vectors("images", ["id"])
    by_id = dict(zip(rows["id"].to_pylist(), vec))
    assert np.allclose([by_id[i] for i in ids], emb.numpy(), atol=1e-4 if cpu else 2e-2)  # same pass
    with pytest.raises(StoreError, match="not in collection 'world'"):
        col.grids([ids[0], "no-such-image"])


def test_the_writer_stores_grids_bit_for_bit_and_refuses_a_wrong_shape(tmp_path, world):
    from clipdex.indexer.reader import SourceItem
    from clipdex.indexer.writer import StoreWriter
    from clipdex.retrieval.store.record import Database

    col = Database(tmp_path / "db", create=True).open_or_create("g", info=world.enc.info, grid=LAYOUT)
    rng = np.random.default_rng(0)
    grids = rng.standard_normal((3, 16, 256)).astype(np.float16)
    writer = StoreWriter(col, source="s")
    for i, g in enumerate(grids):
        v = rng.standard_normal(256).astype(np.float32)
        writer.add(SourceItem(id=f"i{i}", path=f"/x/{i}.png", size=1, mtime=0.0, captions=()), content_hash="h",
                   width=8, height=8, vector=v / np.linalg.norm(v), caption_vectors=np.zeros((0, 256), np.float32),
                   grid=g)
    writer.flush()
    assert np.array_equal(col.grids(["i2", "i0", "i1"]), grids[[2, 0, 1]])
    with pytest.raises(StoreError, match="stores patch-token grids of 16x256"):
        writer.add(SourceItem(id="bad", path="/x/bad.png", size=1, mtime=0.0, captions=()), content_hash="h",
                   width=8, height=8, vector=v, caption_vectors=np.zeros((0, 256), np.float32), grid=grids[0][:8])


def test_an_old_collection_without_grids_searches_indexes_and_checks(tmp_path, world, tiny_world):
    """A collection made before grids (no column, no layout) keeps working: search (without re-ranking, with
    the reason), an index run adding to it (no grids written), clipdex check."""
    from clipdex.indexer.runner import IndexSettings, run_index
    from clipdex.retrieval.store.integrity import check_collection
    from clipdex.retrieval.store.record import Database
    from clipdex.retrieval.store.search import SearchCollection

    image_cols = ["id", "path", "source", "content_hash", "size", "mtime", "width", "height", "captions", "vector"]
    old = Database(tmp_path / "db", create=True).open_or_create("old", info=world.enc.info)  # as before grids
    old.append(world.col.rows(columns=image_cols),
               world.col.rows(columns=["id", "image_id", "text", "vector"], table="captions"))
    assert old.grid_layout() is None
    s = SearchCollection(old, encoder=world.enc)
    q = world.pairs.captions[4][0]
    hits = s.search_text(q, k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5] and all(h.match is None for h in hits)
    assert hits[0].id == world.pairs.ids[4]
    info = s.rerank_info()
    assert info.k == 50 and not info.used and "stores no patch-token grids" in info.reason
    with pytest.raises(StoreError, match="stores no patch-token grids"):
        old.grids([hits[0].id])

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in world.pairs.paths[:2]:
        shutil.copy(p, photos / p.name)
    summary = run_index(IndexSettings(source=str(photos), db=str(tmp_path / "db"), collection="old", workers=0),
                        progress=False, encoder=world.enc)
    assert summary["counts"]["indexed"] == 2 and summary["grid"] is None
    again = Database(tmp_path / "db").open("old")
    assert again.count() == 202 and again.grid_layout() is None
    assert check_collection(again).ok


def test_rerank_orders_the_top_k_by_match_and_keeps_the_cosine(world, matcher_file):
    from clipdex.retrieval.models.matcher import load_matcher, match_scores
    from clipdex.retrieval.store.search import DEFAULT_RERANK, SearchCollection

    s = SearchCollection(world.col, encoder=world.enc, matcher=matcher_file)
    assert s.rerank_info().as_dict() == {"k": DEFAULT_RERANK, "used": True, "reason": None}
    q = world.pairs.captions[7][0]
    dual = s.search_text(q, k=50, rerank=0)
    assert all(h.match is None for h in dual) and s.rerank_info(0).used is False
    cosine = {h.id: h.score for h in dual}

    hits = s.search_text(q, k=10)
    assert [h.rank for h in hits] == list(range(1, 11))
    assert all(a.match >= b.match for a, b in zip(hits, hits[1:]))
    assert all(h.score == pytest.approx(cosine[h.id], abs=1e-6) for h in hits)  # score: still the cosine
    # the reference: the matcher itself, on the stored grids of the dual encoder's top 50
    m = load_matcher(matcher_file).model
    states, mask = world.enc.text_states([q])
    probs = match_scores(m, states, mask, torch.from_numpy(world.col.grids([h.id for h in dual])),
                         torch.tensor([h.score for h in dual])).numpy()
    want = [dual[i].id for i in np.argsort(-probs, kind="stable")[:10]]
    assert [h.id for h in hits] == want
    assert [h.match for h in hits] == pytest.approx(sorted(probs, reverse=True)[:10], abs=1e-6)
    assert [h.id for h in hits] != [h.id for h in dual[:10]]  # re-ranking changed something (50 -> 10)

    few = s.search_text(q, k=5, rerank=3)  # depth max(K, k): the top 5 re-ordered
    assert sorted(h.id for h in few) == sorted(h.id for h in dual[:5])
    floor = dual[19].score
    kept = s.search_text(q, k=10, min_score=floor)  # min_score on the cosine, before re-ranking
    assert {h.id for h in kept} <= {h.id for h in dual[:20]} and all(h.score >= floor for h in kept)
    png = s.search_text(q, k=5, path_glob="*.png")  # filters too
    assert png and all(h.path.endswith(".png") and h.match is not None for h in png)
    assert all(a.match >= b.match for a, b in zip(png, png[1:]))


def test_the_matcher_is_found_beside_the_weights(tmp_path, world, matcher_file, monkeypatch):
    from clipdex.retrieval.models.registry import WEIGHTS_DIR
    from clipdex.retrieval.store import rerank
    from clipdex.retrieval.store.search import SearchCollection

    assert rerank.matcher_path("clipdex-world") == WEIGHTS_DIR / "clipdex-world.matcher.safetensors"
    assert rerank.matcher_path(str(tmp_path / "run" / "x.safetensors")) == tmp_path / "run" / "x.matcher.safetensors"
    (tmp_path / "run").mkdir()
    assert rerank.matcher_path(str(tmp_path / "run")) == tmp_path / "run" / "model.matcher.safetensors"
    assert rerank.matcher_path("clipdex-tiny:random") is None
    shipped = WEIGHTS_DIR / "clipdex-world.matcher.safetensors"
    assert rerank.find_matcher(world.enc) == (shipped if shipped.is_file() else None)

    monkeypatch.setattr(rerank, "matcher_path", lambda spec: matcher_file)
    assert rerank.find_matcher(world.enc) == matcher_file
    s = SearchCollection(world.col, encoder=world.enc)  # no file named: the one found is used
    assert s.rerank_info().used and s.search_text(world.pairs.captions[0][0], k=3)[0].match is not None


def test_a_matcher_of_other_encoder_weights_is_refused(tmp_path, world, monkeypatch, caplog):
    from clipdex.retrieval.store import rerank
    from clipdex.retrieval.store.search import SearchCollection

    stale = _save_matcher(world.enc, tmp_path / "stale.matcher.safetensors", weights="0123456789abcdef")
    with pytest.raises(ModelMismatchError, match="trained for encoder weights '0123456789abcdef'") as e:
        rerank.load_matcher_for(world.enc, stale)
    assert world.enc.info.weights in str(e.value)
    with pytest.raises(ModelMismatchError, match="trained for encoder weights"):  # named explicitly: an error
        SearchCollection(world.col, encoder=world.enc, matcher=stale).search_text("a red circle", k=3)

    monkeypatch.setattr(rerank, "matcher_path", lambda spec: stale)  # found beside the weights: skipped, said why
    s = SearchCollection(world.col, encoder=world.enc)
    with caplog.at_level(logging.WARNING, logger="clipdex.retrieval.store.search"):
        hits = s.search_text("a red circle", k=3)
    assert all(h.match is None for h in hits) and "not re-ranking" in caplog.text
    info = s.rerank_info()
    assert not info.used and "trained for encoder weights '0123456789abcdef'" in info.reason


def test_search_cli_json_says_whether_it_reranked(world, matcher_file, monkeypatch):
    from clipdex.retrieval.models import encoder as encoder_module
    from clipdex.retrieval.store import rerank

    monkeypatch.setattr(encoder_module, "load_encoder", lambda spec, **kw: world.enc)  # the loaded one, no reload
    monkeypatch.setattr(rerank, "matcher_path", lambda spec: matcher_file)
    q = world.pairs.captions[2][0]
    base = ["search", q, "--db", str(world.db), "--collection", "world", "-k", "4"]
    out = json.loads(run_cli(*base, "--json").stdout)
    assert out["rerank"] == {"k": 50, "used": True, "reason": None}
    assert all(set(r) == {"rank", "id", "path", "caption", "score", "match"} for r in out["results"])
    assert [r["match"] for r in out["results"]] == sorted((r["match"] for r in out["results"]), reverse=True)
    off = json.loads(run_cli(*base, "--rerank", "0", "--json").stdout)
    assert off["rerank"]["used"] is False and "off" in off["rerank"]["reason"]
    assert all(r["match"] is None for r in off["results"])
    table = run_cli(*base, "--rerank", "20").stdout
    assert table.splitlines()[0].split() == ["rank", "match", "score", "path"]
    bad = run_cli(*base, "--rerank", "-1", check=False)
    assert bad.returncode == 2 and "--rerank" in bad.stderr


def test_text_query_gives_the_embedding_and_the_token_features_in_one_pass(world):
    q = world.pairs.captions[3][0]
    emb, states, mask = world.enc.text_query(q)
    np.testing.assert_allclose(emb, world.enc.encode_texts([q])[0], atol=1e-5)
    want_states, want_mask = world.enc.text_states([q])
    assert torch.equal(mask, want_mask) and states.shape == want_states.shape
    torch.testing.assert_close(states, want_states, atol=1e-5, rtol=1e-5)
    width = world.enc.model.ln_final.normalized_shape[0]
    assert states.shape[-1] == 2 * width  # the final states, then the token embeddings
    tokens = world.enc.tokenizer([q])[0, : states.shape[1]]
    torch.testing.assert_close(states[0, :, width:], world.enc.model.token_embedding(tokens).float())
