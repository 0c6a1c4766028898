"""The store's query API (record.Collection) and the FAISS accelerator on a tiny collection built directly with
the record's own writes: real LanceDB and FAISS, random unit vectors, no model training."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest

from clipdex.exceptions import ClipdexError, StoreError
from clipdex.retrieval.store.faiss_index import load_for
from clipdex.retrieval.store.record import Database
from clipdex.retrieval.store.schema import FILTER_COLUMNS
from clipdex.retrieval.store.search import SearchCollection

DIM = 16
N = 40  # images; image i has i % 3 captions, and comes from source "a" (even i) or "b" (odd i)


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _fixed(vec: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1), pa.float32()), vec.shape[1])


def _info(dim: int):
    from clipdex.retrieval.models.encoder import EncoderInfo

    return EncoderInfo(spec="test", arch="t", embed_dim=dim, image_size=8, context_length=77, mean=(0.5,),
                       std=(0.5,))


def _fill(col, *, n: int, dim: int, seed: int = 0) -> dict:
    """``n`` images (ids ``img00``...) with ``i % 3`` captions each; returns the vectors and captions."""
    ids = [f"img{i:02d}" for i in range(n)]
    img = _unit(n, dim, seed)
    caps = {i: [f"caption {k} of {i}" for k in range(int(i[3:]) % 3)] for i in ids}
    cap_ids = [f"{i}#{k}" for i in ids for k in range(len(caps[i]))]
    cap_vec = _unit(len(cap_ids), dim, seed + 1)
    images = pa.table({
        "id": ids, "path": [f"/photos/{'a' if k % 2 == 0 else 'b'}/{i}.png" for k, i in enumerate(ids)],
        "source": ["/photos/a" if k % 2 == 0 else "/photos/b" for k in range(n)],
        "content_hash": ["h"] * n, "size": list(range(n)), "mtime": [0.0] * n, "width": [8] * n,
        "height": [8 + k for k in range(n)], "captions": [caps[i] for i in ids], "vector": _fixed(img)})
    captions = pa.table({"id": cap_ids, "image_id": [c.split("#")[0] for c in cap_ids],
                         "text": [caps[c.split("#")[0]][int(c.split("#")[1])] for c in cap_ids],
                         "vector": _fixed(cap_vec)})
    col.append(images, captions)
    return {"ids": ids, "img": img, "caps": caps, "cap_ids": cap_ids, "cap_vec": cap_vec}


@pytest.fixture()
def tiny(tmp_path):
    col = Database(tmp_path / "db", create=True).open_or_create("c", info=_info(DIM))
    return col, _fill(col, n=N, dim=DIM)


def test_counts_ids_rows_and_sources(tiny):
    col, d = tiny
    n_caps = sum(len(c) for c in d["caps"].values())
    assert col.count() == col.count("images") == N
    assert col.caption_count() == col.count("captions") == n_caps == len(d["cap_ids"])
    assert sorted(col.ids()) == d["ids"] and sorted(col.ids("captions")) == sorted(d["cap_ids"])
    assert sorted(col.ids(where="height >= 40")) == d["ids"][32:]
    assert col.sources() == ["/photos/a", "/photos/b"]
    got = col.rows(["img03", "img07", "nosuch"], columns=("id", "captions", "vector")).to_pylist()
    by_id = {r["id"]: r for r in got}
    assert set(by_id) == {"img03", "img07"}  # an id not in the table is left out
    assert by_id["img07"]["captions"] == d["caps"]["img07"]
    np.testing.assert_allclose(by_id["img03"]["vector"], d["img"][3])
    assert col.rows([], columns=("id", "path")).column_names == ["id", "path"]
    assert col.rows(columns=("id",)).num_rows == N
    with pytest.raises(StoreError, match="unknown table 'pictures'.*images, captions"):
        col.count("pictures")


def test_nearest_applies_the_prefilter_before_the_search(tiny):
    col, d = tiny
    q = d["img"][5]
    t = col.nearest("images", q, k=6, where="source = '/photos/b'", columns=("id", "path"))
    odd = np.arange(1, N, 2)
    want = odd[np.argsort(-(d["img"][odd] @ q))][:6]
    assert t.column("id").to_pylist() == [d["ids"][i] for i in want]  # k results, all from the filter
    np.testing.assert_allclose(t.column("score").to_numpy(), np.sort(d["img"][odd] @ q)[::-1][:6], atol=1e-5)
    # captions: the filter is over their images' columns
    caps = col.nearest("captions", q, k=100, where="height < 14", columns=("id", "image_id", "text"))
    assert set(caps.column("image_id").to_pylist()) == {i for i in d["ids"][:6] if d["caps"][i]}
    assert col.nearest("captions", q, k=5, where="height > 1000").num_rows == 0


def test_search_returns_the_asked_columns_from_faiss_and_from_the_filtered_path(tiny):
    col, d = tiny
    s = SearchCollection(col)
    q = d["img"][11]
    fast = s.search_vector(q, k=4, columns=("captions", "vector"))
    exact = np.argsort(-(d["img"] @ q))[:4]
    assert [h.id for h in fast] == [d["ids"][i] for i in exact]
    filtered = s.search_vector(q, k=4, where="size >= 0", columns=("captions", "vector"))
    assert [h.id for h in filtered] == [h.id for h in fast]
    for a, b in zip(fast, filtered):
        assert a.extra["captions"] == b.extra["captions"] == d["caps"][a.id]
        np.testing.assert_allclose(a.extra["vector"], b.extra["vector"])
        assert a.as_dict() == {"rank": a.rank, "id": a.id, "path": a.path, "caption": None, "score": a.score,
                               "match": None}
    assert s.search_vector(q, k=3)[0].extra is None  # nothing asked, nothing fetched


def test_faiss_index_covers_the_table_and_goes_stale_on_append(tiny, tmp_path):
    col, d = tiny
    loaded = load_for(col, "captions")
    assert loaded.sidecar["rows"] == col.caption_count() and sorted(loaded.columns["id"]) == sorted(d["cap_ids"])
    scores, pos = loaded.search(d["cap_vec"][:1], 1)
    assert loaded.columns["id"][pos[0][0]] == d["cap_ids"][0] and scores[0][0] == pytest.approx(1.0, abs=1e-5)
    more = Database(tmp_path / "db").open("c")
    extra = pa.table({"id": ["x"], "path": ["/x.png"], "source": ["/x"], "content_hash": ["h"], "size": [1],
                       "mtime": [0.0], "width": [8], "height": [8], "captions": [[]],
                       "vector": _fixed(_unit(1, DIM, 9))})
    more.append(extra, None)
    assert load_for(col, "images").sidecar["rows"] == N + 1  # rebuilt: the table changed under it


@pytest.mark.parametrize("where", ["nosuch_column > 1", "height >>> 3"])
def test_a_bad_filter_names_the_columns_one_can_filter_on(tiny, where):
    col, d = tiny
    s = SearchCollection(col)
    for table in ("images", "captions"):
        with pytest.raises(ClipdexError) as e:
            s.search_vector(d["img"][0], table=table, k=3, where=where)
        assert f"bad filter '({where})'" in str(e.value) and ", ".join(FILTER_COLUMNS) in str(e.value)


def test_search_help_lists_the_filter_columns(capsys):
    from clipdex.cli import main

    with pytest.raises(SystemExit):
        main(["search", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ", ".join(FILTER_COLUMNS) in help_text


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_blank_text_query_is_refused(tiny, text):
    col, _ = tiny
    with pytest.raises(ClipdexError, match="empty text query"):
        SearchCollection(col).search_text(text)  # refused before any model is loaded


@pytest.fixture(scope="module")
def world_encoder():
    from clipdex.retrieval.models.encoder import load_encoder

    return load_encoder("clipdex-world", device="cpu")


def test_a_query_longer_than_the_context_is_cut_with_a_warning(tmp_path, world_encoder, caplog):
    enc = world_encoder
    col = Database(tmp_path / "db", create=True).open_or_create("w", info=enc.info)
    _fill(col, n=8, dim=enc.info.embed_dim)
    s = SearchCollection(col, encoder=enc)
    long = " ".join(["red circle"] * 60)
    n = enc.token_count(long)
    assert n > enc.context_length == 77
    with caplog.at_level(logging.WARNING, logger="clipdex.retrieval.store.search"):
        s.search_text("a red circle", k=2)
        assert not caplog.records  # a short query says nothing
        hits = s.search_text(long, k=2)
    assert len(hits) == 2
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert f"kept its first {enc.context_length} of {n} tokens" in caplog.records[0].getMessage()
    assert enc.token_count("a red circle") == int((enc.tokenizer(["a red circle"])[0] != 0).sum())


@pytest.mark.parametrize("name", ["../evil", "a/b", ""])
def test_a_bad_collection_name_creates_no_database_folder(tmp_path, capsys, name):
    from clipdex.cli import main

    src = tmp_path / "photos"
    src.mkdir()
    db = tmp_path / "new" / "db"
    assert main(["index", str(src), "--db", str(db), "--collection", name, "--no-progress"]) == 1
    assert "bad collection name" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_answering_gets_captions_and_vectors_with_the_hits(tmp_path, world_encoder):
    from clipdex.retrieval.answer.answerer import Answerer
    from clipdex.retrieval.answer.backend import (
        AnswerBackend,
        Evidence,
        GeneratedAnswer,
    )

    class FirstCaptions(AnswerBackend):  # the protocol's default check_encoder accepts any collection
        name = "first-captions"

        def generate(self, *, question, image, image_vector, items, max_new_tokens=32, beams=1):
            return GeneratedAnswer(" | ".join(it.caption or "-" for it in items), [1.0] + [0.0] * (len(items) - 1))

    col = Database(tmp_path / "db", create=True).open_or_create("w", info=world_encoder.info)
    d = _fill(col, n=12, dim=world_encoder.info.embed_dim)
    answerer = Answerer(SearchCollection(col, encoder=world_encoder), FirstCaptions())
    _, _, items = answerer.retrieve(question="a red circle", k=4)
    for it in items:
        i = d["ids"].index(it.id)
        np.testing.assert_allclose(it.vector, d["img"][i])
        assert it.caption == (d["caps"][it.id][0] if d["caps"][it.id] else None)
    result = answerer.ask(question="a red circle", k=4)
    assert all(isinstance(e, Evidence) for e in result.evidence)
    assert [e.id for e in result.evidence] == [it.id for it in items]
    assert result.answer == " | ".join(it.caption or "-" for it in items)
    first = result.as_dict()["evidence"][0]
    assert list(first) == ["rank", "id", "path", "caption", "score", "weight"] and first["weight"] == 1.0


def test_fragments_written_elsewhere_are_committed_whole_and_once(tmp_path):
    """The Ray engine's write path without Ray: rows written as uncommitted fragments are invisible until the
    committer adds them (captions and images, the schema metadata untouched); the same output again is refused,
    and a changed file's old rows go when its new fragments are committed."""
    import json

    from clipdex.indexer.ray_engine import FragmentCommitter
    from clipdex.indexer.reader import SourceItem
    from clipdex.indexer.writer import Rows
    from clipdex.retrieval.store.record import write_fragments

    col = Database(tmp_path / "db", create=True).open_or_create("c", info=_info(DIM))
    meta = {t: col.fragment_targets()[t][1].metadata for t in ("images", "captions")}

    def output(ids, seed):
        rows = Rows(source="/s", dim=DIM, grid=None)
        for k, i in enumerate(ids):
            rows.add(SourceItem(id=i, path=f"/s/{i}.png", captions=(f"a caption of {i}",), size=1, mtime=0.0),
                     content_hash=f"h{seed}", width=8, height=8, vector=_unit(1, DIM, seed + k)[0],
                     caption_vectors=_unit(1, DIM, seed + 100 + k))
        images, captions = rows.tables()
        targets = col.fragment_targets()
        return {"images": json.dumps(write_fragments(*targets["images"], images)),
                "captions": json.dumps(write_fragments(*targets["captions"], captions)), "ids": json.dumps(ids)}

    first = output(["a", "b"], seed=1)
    assert col.count() == 0 and col.caption_count() == 0  # written, not committed: nobody sees them
    committer = FragmentCommitter(col, replace=set(), flush_rows=3, flush_seconds=60)
    assert committer.add(first) and col.count() == 0  # taken, not yet due (2 of 3 rows)
    assert not committer.add(first)  # a retried task's output arriving twice
    committer.flush()
    assert col.count() == 2 and col.caption_count() == 2 and committer.commits == 1
    rerun = FragmentCommitter(col, replace={"a"}, flush_rows=1)  # the next run: "a" changed
    assert rerun.add(output(["a"], seed=7))  # due at once: its old rows go, the new ones come in
    t = col.rows(columns=["id", "content_hash"]).sort_by("id")
    assert t["id"].to_pylist() == ["a", "b"] and t["content_hash"].to_pylist() == ["h7", "h1"]
    assert sorted(col.ids("captions")) == ["a#0", "b#0"]
    assert {t: col.fragment_targets()[t][1].metadata for t in ("images", "captions")} == meta
