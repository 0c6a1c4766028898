"""Indexing and search end to end: the CLI (in process; a real subprocess where only one shows the
behaviour), real LanceDB and real FAISS on a tiny world."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import kill_after_rows, run_cli

RESULT_KEYS = {"rank", "id", "path", "caption", "score", "match"}


def _index(source, db, *extra):
    return json.loads(run_cli("index", str(source), "--db", str(db), *extra, "--json").stdout)


def _search(db, *args):
    return json.loads(run_cli("search", *args, "--db", str(db), "--json").stdout)


def _rows(db, collection):
    """(ids, vectors) of a collection's images and captions, sorted by id, read straight from LanceDB."""
    from clipdex.retrieval.store.record import Database

    col = Database(db).open(collection)
    out = {}
    for table in ("images", "captions"):
        vec, rows = col.vectors(table, ["id"])
        order = np.argsort(rows["id"].to_pylist())
        out[table] = ([rows["id"].to_pylist()[i] for i in order], vec[order])
    return out


def test_index_manifest_then_recall(world_db, tiny_world):
    db, summary = world_db
    c = summary["counts"]
    assert c["indexed"] == c["new"] == 200 and c["failed"] == 0
    assert c["images_in_collection"] == 200 and c["captions_in_collection"] == 1000
    assert set(summary["seconds"]) >= {"read", "decode_wait", "embed", "write", "faiss", "total"}
    assert summary["faiss"]["images"]["factory"] == "Flat" and summary["faiss"]["images"]["rows"] == 200
    out = json.loads(run_cli("eval", "retrieval", "--db", str(db), "--collection", "world", "--manifest",
                             str(tiny_world), "--split", "test", "--gallery", "200", "--json").stdout)
    assert out["gallery"] == 200 and set(out["t2i"]) == {"recall@1", "recall@5", "recall@10"}
    assert out["t2i"]["recall@5"] >= 0.9 and out["i2t"]["recall@5"] >= 0.9, out


def test_text_search_finds_images_by_their_own_captions(world_db, tiny_world):
    """Python API: most images come back in the top 5 for one of their own captions."""
    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.retrieval.store.search import open_collection

    db, _ = world_db
    pairs = load_pairs(tiny_world, split="test")
    col = open_collection(db, collection="world")
    found = [any(h.id == i for h in col.search_text(caps[1], k=5)) for i, caps in zip(pairs.ids, pairs.captions)]
    assert np.mean(found) >= 0.9, np.mean(found)
    hits = col.search_text(pairs.captions[0][0], k=7)
    assert [h.rank for h in hits] == list(range(1, 8))
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_search_cli_json_contract_and_image_to_text(world_db, tiny_world):
    from clipdex.data_manifests.pairs import load_pairs

    db, _ = world_db
    pairs = load_pairs(tiny_world, split="test")
    out = _search(db, pairs.captions[3][0], "--collection", "world", "-k", "5")
    assert out["query"] == pairs.captions[3][0] and len(out["results"]) == 5
    assert all(set(r) == RESULT_KEYS for r in out["results"])
    assert out["results"][0]["path"].endswith(pairs.paths[3].name)
    out = _search(db, "--image", str(pairs.paths[0]), "--captions", "--collection", "world", "-k", "3")
    assert all(RESULT_KEYS <= set(r) and r["caption"] and r["path"] is None for r in out["results"])
    assert out["results"][0]["caption"] in pairs.captions[0]
    img = _search(db, "--image", str(pairs.paths[5]), "--collection", "world", "-k", "3")
    assert img["results"][0]["id"] == pairs.ids[5] and img["results"][0]["score"] > 0.99  # itself first
    table = run_cli("search", "a red circle", "--db", str(db), "--collection", "world", "-k", "2").stdout
    assert "rank" in table and "score" in table


def test_image_to_text_returns_own_captions(world_db, tiny_world):
    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.retrieval.store.search import open_collection

    db, _ = world_db
    pairs = load_pairs(tiny_world, split="test")
    col = open_collection(db, collection="world")
    own = [col.search_captions(p, k=1)[0].caption in caps for p, caps in zip(pairs.paths[:50], pairs.captions)]
    assert np.mean(own) >= 0.9
    hits = col.search_captions(pairs.paths[0], k=5)
    assert all(h.image_id and h.id.startswith(h.image_id + "#") for h in hits)


def test_reindex_is_a_noop(world_db, tiny_world):
    from clipdex.retrieval.store.record import Database

    db, _ = world_db
    before = Database(db).open("world").versions()
    again = _index(tiny_world, db, "--split", "test", "--collection", "world")
    assert again["counts"]["indexed"] == 0 and again["counts"]["unchanged"] == 200
    assert Database(db).open("world").versions() == before  # nothing written at all
    assert "load_model" not in again["seconds"] and again["device"] is None  # nothing to embed: no model loaded


def test_filters(world_db):
    db, _ = world_db
    out = _search(db, "a shape", "--collection", "world", "-k", "50", "--path", "*.png")
    assert out["results"] and all(r["path"].endswith(".png") for r in out["results"])
    out = _search(db, "a shape", "--collection", "world", "-k", "5", "--where", "width > 100000")
    assert out["results"] == []
    out = _search(db, "a shape", "--collection", "world", "-k", "5", "--min-score", "2")
    assert out["results"] == []
    bad = run_cli("search", "x", "--db", str(db), "--collection", "world", "--where", "nosuchcol = 1", check=False)
    assert bad.returncode == 1 and "bad filter" in bad.stderr


def test_model_mismatch_is_refused(world_db, tiny_world):
    db, _ = world_db
    p = run_cli("index", str(tiny_world), "--split", "test", "--db", str(db), "--collection", "world",
                "--model", "clipdex-tiny:random", check=False)
    assert p.returncode == 1 and "indexed with 'clipdex-world'" in p.stderr, p.stderr
    p = run_cli("search", "x", "--db", str(db), "--collection", "world", "--model", "clipdex-tiny:random", check=False)
    assert p.returncode == 1 and "indexed with" in p.stderr
    p = run_cli("search", "x", "--db", str(db), "--collection", "nope", check=False)
    assert p.returncode == 1 and "no collection 'nope'" in p.stderr and "world" in p.stderr
    listed = json.loads(run_cli("collections", "--db", str(db), "--json").stdout)
    assert [c["collection"] for c in listed["collections"]] == ["world"]


def _bomb_png(path: Path) -> None:
    """A tiny PNG whose header claims 40000 x 40000 pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))


@pytest.fixture()
def photo_folder(tiny_world, tmp_path):
    """30 world images in a folder tree, plus bad files of every kind."""
    from clipdex.data_manifests.pairs import load_pairs

    pairs = load_pairs(tiny_world, split="test")
    root = tmp_path / "photos"
    for i, p in enumerate(pairs.paths[:30]):
        dest = root / f"trip-{i % 3}" / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    (root / "notes.txt").write_text("not an image")
    (root / "trip-0" / "fake.jpg").write_text("this is text, not a JPEG")
    good = pairs.paths[40].read_bytes()
    (root / "trip-1" / f"truncated{pairs.paths[40].suffix}").write_bytes(good[: len(good) // 3])
    (root / "trip-2" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    _bomb_png(root / "trip-2" / "bomb.png")
    return root, pairs


def test_folder_bad_files_then_add_change_delete(photo_folder, tmp_path):
    root, pairs = photo_folder
    db = tmp_path / "db"
    s = _index(root, db)
    c = s["counts"]
    assert c["indexed"] == 30 and c["ignored_non_images"] == 1 and c["images_in_collection"] == 30
    reasons = {Path(f["path"]).name: f["reason"] for f in s["failures"]}
    assert set(reasons) == {"fake.jpg", f"truncated{pairs.paths[40].suffix}", "corrupt.png", "bomb.png"}, reasons
    assert "decompression bomb" in reasons["bomb.png"] and "not an image" in reasons["fake.jpg"]
    table = run_cli("index", str(root), "--db", str(db), "--no-progress").stdout
    assert "30 unchanged" in table and "bomb.png" in table  # the readable report names the culprits too

    # add one, change one (new content under the same name), delete one
    added = root / "trip-0" / "new.png"
    shutil.copy(pairs.paths[50], added)
    changed = root / "trip-1" / pairs.paths[1].name
    changed.write_bytes(pairs.paths[60].read_bytes())
    os.utime(changed, (time.time() + 5, time.time() + 5))
    deleted = root / "trip-2" / pairs.paths[2].name
    deleted.unlink()
    s = _index(root, db)
    c = s["counts"]
    # the four bad files are not in the collection, so they count as new and are tried again (and fail again)
    assert (c["new"], c["changed"], c["removed"], c["unchanged"], c["failed"]) == (5, 1, 1, 28, 4), c
    assert c["indexed"] == 2
    assert c["images_in_collection"] == 30
    hit = _search(db, pairs.captions[60][0], "-k", "1")["results"][0]
    assert hit["path"] == str(changed.resolve())  # the changed file is found by its new content
    ids = {r["id"] for r in _search(db, "shape", "-k", "100")["results"]}
    assert str(added.resolve()) in ids and str(deleted.resolve()) not in ids
    os.utime(added, (time.time() + 9, time.time() + 9))  # touched, same bytes: hashed, not re-embedded
    assert _index(root, db)["counts"]["indexed"] == 0


def _descendants(pid: int) -> list[int]:
    """Pids of every process below ``pid`` (from /proc)."""
    parents = {}
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
            parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited


@pytest.mark.slow
def test_sigkill_mid_run_resumes_to_the_same_rows(tiny_world, app_db, tmp_path):
    """A real process killed mid-run (after 2 of its 4 appends), then the same command re-run (in this process:
    only the kill needs its own): the rows equal those of an uninterrupted run of the same split (``app_db``: the
    corpus split indexed in one go, with the default batch size). Its decoding worker is gone within a second."""
    args = ["index", str(tiny_world), "--split", "corpus", "--collection", "k", "--batch-size", "16",
            "--flush-rows", "16", "--workers", "1", "--no-faiss", "--no-progress"]
    db = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "clipdex", *args, "--db", str(db)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    killed_at = kill_after_rows(proc, db=db, table="k__images", rows=32, timeout=120,
                                before_kill=lambda: workers.extend(_descendants(proc.pid)))
    assert killed_at is not None and killed_at < 64, "the run finished before it could be killed"
    assert workers, "the indexer had no worker processes to check"
    t0 = time.time()
    while any(_alive(w) for w in workers) and time.time() - t0 < 1:
        time.sleep(0.02)
    assert not [w for w in workers if _alive(w)], "decoding workers outlived the killed indexer"
    rerun = run_cli(*args, "--db", str(db)).stdout
    unchanged = int(re.search(r"(\d+) unchanged", rerun).group(1))
    assert killed_at <= unchanged < 64, rerun  # what the killed run wrote is kept, not embedded again
    got, want = _rows(db, "k"), _rows(app_db, "world")
    assert len(got["images"][0]) == 64 and len(got["captions"][0]) == 320
    for table in ("images", "captions"):
        assert got[table][0] == want[table][0]  # the same ids: nothing lost, nothing duplicated
        np.testing.assert_allclose(got[table][1], want[table][1], atol=1e-5)


def test_two_collections_in_one_db(photo_folder, app_db, tmp_path):
    root, _ = photo_folder
    db = tmp_path / "db"
    shutil.copytree(app_db, db)  # collection "world": the tiny world's corpus split, indexed once per session
    _index(root, db, "--collection", "photos")
    listed = json.loads(run_cli("collections", "--db", str(db), "--json").stdout)["collections"]
    # world: 60 corpus scenes + 4 landmarks
    assert {c["collection"]: c["images"] for c in listed} == {"photos": 30, "world": 64}
    p = run_cli("index", str(root), "--db", str(db), "--collection", "bad name!", check=False)
    assert p.returncode == 1 and "bad collection name" in p.stderr


def test_every_format_and_exif_orientation(tiny_world, tmp_path):
    """WebP, GIF (first frame), BMP, TIFF, PNG and JPEG are indexed; EXIF orientation is applied first."""
    from PIL import Image

    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.indexer.runner import IndexSettings, run_index
    from clipdex.retrieval.store.search import open_collection

    pairs = load_pairs(tiny_world, split="test")
    root = tmp_path / "formats"
    root.mkdir()
    src = [Image.open(p).convert("RGB") for p in pairs.paths[:6]]
    for im, ext in zip(src, ["webp", "gif", "bmp", "tiff", "png", "jpg"]):
        im.save(root / f"img.{ext}")
    wide = src[0].resize((96, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown turned a quarter
    wide.save(root / "rotated.jpg", exif=exif)
    calls = []
    s = run_index(IndexSettings(source=str(root), db=str(tmp_path / "db"), workers=1, batch_size=4),
                  progress=False, on_progress=lambda done, total: calls.append((done, total)))
    assert s["counts"]["indexed"] == 7 and s["failures"] == []
    assert calls == [(0, 7), (4, 7), (7, 7)]  # after the plan, then after each batch
    col = open_collection(tmp_path / "db")
    t = col.collection.rows(columns=["path", "width", "height"]).to_pylist()
    size = {Path(r["path"]).name: (r["width"], r["height"]) for r in t}
    assert size["rotated.jpg"] == (48, 96)
    for ext in ["webp", "gif", "bmp", "tiff", "png"]:  # each file is found by its own picture
        assert col.search_image(root / f"img.{ext}", k=1)[0].path.endswith(f"img.{ext}")


def test_manifest_rows_sharing_a_file_and_caption_edits(tiny_world, tmp_path):
    """One file under several ids (a row per caption) stays stable; an edited caption is re-embedded."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.indexer.runner import IndexSettings, run_index

    pairs = load_pairs(tiny_world, split="test")
    manifest = tmp_path / "pairs.csv"

    def write(captions):
        pcsv.write_csv(pa.table({"id": ["a", "b", "c"], "path": [str(pairs.paths[0])] * 2 + [str(pairs.paths[1])],
                                 "caption": captions}), manifest)

    settings = IndexSettings(source=str(manifest), db=str(tmp_path / "db"), collection="m", workers=0)
    write(pairs.captions[0][:2] + pairs.captions[1][:1])
    assert run_index(settings, progress=False)["counts"]["indexed"] == 3
    again = run_index(settings, progress=False)["counts"]
    assert (again["indexed"], again["unchanged"], again["images_in_collection"]) == (0, 3, 3)
    write(pairs.captions[0][:2] + ["an edited caption"])
    edited = run_index(settings, progress=False)["counts"]
    assert (edited["changed"], edited["images_in_collection"], edited["captions_in_collection"]) == (1, 3, 3)
    rows = _rows(tmp_path / "db", "m")
    assert rows["images"][0] == ["a", "b", "c"] and rows["captions"][0] == ["a#0", "b#0", "c#0"]


def test_unreadable_names_and_changed_files_that_break(tiny_world, tmp_path):
    """A file name that is not UTF-8 is reported, not fatal; a changed file that no longer decodes keeps
    its old row (nothing indexed is lost) and is reported."""
    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.indexer.runner import IndexSettings, run_index

    pairs = load_pairs(tiny_world, split="test")
    root = tmp_path / "p"
    root.mkdir()
    for i in range(3):
        shutil.copy(pairs.paths[i], root / f"ok{i}{pairs.paths[i].suffix}")
    weird = os.path.join(os.fsencode(root), b"caf\xe9.png")
    shutil.copy(pairs.paths[3], weird)
    settings = IndexSettings(source=str(root), db=str(tmp_path / "db"), workers=0)
    s = run_index(settings, progress=False)
    assert s["counts"]["indexed"] == 3 and "not valid UTF-8" in s["failures"][0]["reason"]
    victim = root / f"ok0{pairs.paths[0].suffix}"
    victim.write_bytes(b"now garbage")
    s = run_index(settings, progress=False)
    assert s["counts"]["changed"] == 1 and s["counts"]["images_in_collection"] == 3
    assert any(f["path"] == str(victim) for f in s["failures"])
