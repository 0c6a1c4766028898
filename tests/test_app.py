"""The Streamlit app: input checks, the server command, and each page under Streamlit's AppTest against the
real backend (the tiny world's corpus indexed into a temporary database by the ``app_db`` fixture)."""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from clipdex.app.inputs import InputError, check_index_folder, check_upload

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "app" / "main.py"
ARTIFACTS = REPO / "artifacts"


def _png(size=(32, 32), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


# --- input checks (no Streamlit) ----------------------------------------------------------------------------
def test_upload_accepts_an_image_and_names_what_is_wrong_with_others():
    im = check_upload("red.png", _png(), max_bytes=2**20, max_pixels=10_000)
    assert im.mode == "RGB" and im.size == (32, 32) and im.getpixel((0, 0)) == (200, 30, 30)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # Ghostscript would run it
    cases = [
        ("doc.pdf", _png(), "upload a jpg"),  # the type, by name
        ("empty.png", b"", "is empty"),
        ("big.png", _png() + b"\0" * 2**20, "the limit is 1 MB"),
        ("notes.png", b"hello, not an image", "is not a JPEG, PNG"),  # the type, by decoding
        ("vector.jpg", eps, "is not a JPEG, PNG"),  # a format PIL knows but uploads may not use
        ("bomb.png", _png((200, 200)), "decompression bomb"),  # 40,000 pixels over a 10,000 limit
        ("cut.png", _png()[:60], "cannot be decoded"),  # truncated
    ]
    for name, data, message in cases:
        with pytest.raises(InputError, match=re.escape(message)):
            check_upload(name, data, max_bytes=2**20, max_pixels=10_000)


def test_index_folder_must_be_under_a_root_and_outside_the_database(tmp_path):
    root, other, db = tmp_path / "root", tmp_path / "other", tmp_path / "root" / "db"
    (root / "photos").mkdir(parents=True)
    other.mkdir()
    db.mkdir()
    (root / "escape").symlink_to(other)
    ok = dict(roots=(str(root),), db=str(db))
    assert check_index_folder(str(root / "photos"), **ok) == (root / "photos").resolve()
    assert check_index_folder(f"{root}/photos/../photos", **ok) == (root / "photos").resolve()
    for text, message in [("", "absolute path of a folder"), ("photos", "not an absolute path"),
                          (str(other), "outside the folders"), (f"{root}/../other", "outside the folders"),
                          (str(root / "escape"), "outside the folders"),  # a symlink out of the root
                          (str(root / "missing"), "no such folder"), (str(db), "inside the database folder"),
                          (str(MAIN), "outside the folders"), (str(root / "photos" / "x.jpg"), "no such folder")]:
        with pytest.raises(InputError, match=message):
            check_index_folder(text, **ok)


def test_app_command_binds_locally_with_xsrf_and_an_upload_limit():
    from clipdex.app.settings import AppSettings
    from clipdex.cli import build_parser
    from clipdex.commands.app import streamlit_command

    args = build_parser().parse_args(["app", "--db", "some/db"])
    assert (args.host, args.port, args.max_upload_mb) == ("127.0.0.1", 8501, 20)
    cmd = streamlit_command(host=args.host, port=args.port, max_upload_mb=7)
    flags = dict(zip(cmd[5::2], cmd[6::2]))
    assert cmd[1:4] == ["-m", "streamlit", "run"] and Path(cmd[4]) == MAIN
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.enableXsrfProtection"] == "true"
    assert flags["--server.maxUploadSize"] == "7" and flags["--browser.gatherUsageStats"] == "false"
    assert flags["--server.headless"] == "true" and flags["--client.showErrorDetails"] == "type"
    s = AppSettings(db="some/db", collection="c", index_roots=("/a", "/b"), max_upload_mb=7)
    assert AppSettings.from_env(s.as_env()) == AppSettings(db=str(Path("some/db").resolve()), collection="c",
                                                           index_roots=("/a", "/b"), max_upload_mb=7)


# --- pages under AppTest ------------------------------------------------------------------------------------
@pytest.fixture()
def app_env(app_db, monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPDEX_APP_DB", str(app_db))
    monkeypatch.setenv("CLIPDEX_APP_COLLECTION", "world")
    monkeypatch.setenv("CLIPDEX_APP_INDEX_ROOTS", str(tmp_path))
    return app_db


def _open(page: str | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(MAIN), default_timeout=120).run()
    if page:
        at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _results(at) -> tuple[int, float]:
    """(count, milliseconds) from the page's "N results in X ms" line."""
    (line,) = [c.value for c in at.caption if " results in " in c.value]
    n, ms = re.match(r"(\d+) results in (\d+) ms", line).groups()
    return int(n), float(ms)


def _hit_ids(at) -> list[str]:
    return [b.key.split("_", 2)[2] for b in at.button if b.key and b.key.startswith("more_")]


def test_search_page_text_to_image_filters_and_more_like_this(app_env, tiny_world):
    from clipdex.data_manifests.pairs import load_pairs

    pairs = load_pairs(tiny_world, split="corpus")
    path_of = dict(zip(pairs.ids, map(str, pairs.paths)))
    at = _open()
    assert at.title[0].value == "Search" and at.sidebar.selectbox(key="collection").value == "world"
    latencies, found = [], 0
    for n in range(6):  # a scene's own caption finds it: the real encoder and index answered
        at.text_input(key="search_text").input(pairs.captions[n][0]).run()
        count, ms = _results(at)
        ids = _hit_ids(at)
        assert count == len(ids) == 12 and len(at.get("image")) == 12
        found += pairs.ids[n] in ids[:5]
        latencies.append(ms)
    assert found >= 5
    assert max(latencies) < 1000, latencies
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "app-search-latency.json").write_text(json.dumps({"apptest_text_to_image_ms": latencies}))

    at.slider(key="search_k").set_value(5)
    at.text_input(key="search_path").input("*.png").run()
    ids = _hit_ids(at)
    assert 0 < len(ids) <= 5 and all(path_of[i].endswith(".png") for i in ids)

    first = ids[0]
    at.button(key=f"more_1_{first}").click().run()  # "more like this": image -> image with that result
    assert at.radio(key="direction").value == "image → image"
    assert at.selectbox(key="search_pick_id").value == first
    assert _hit_ids(at)[0] == first and "score `1.000`" in at.markdown[0].value  # itself, first

    at.text_input(key="search_path").input("").run()
    at.slider(key="search_min_score").set_value(0.99).run()
    assert _hit_ids(at) == [first]  # nothing else is that close


def test_search_page_image_to_text_shows_the_images_own_captions(app_env, tiny_world):
    from clipdex.data_manifests.pairs import load_pairs

    pairs = load_pairs(tiny_world, split="corpus")
    at = _open()
    at.radio(key="direction").set_value("image → text").run()
    at.radio(key="search_source").set_value("Pick from the collection").run()
    at.selectbox(key="search_pick_id").set_value(pairs.ids[3]).run()
    rows = at.dataframe[0].value
    assert len(rows) == 12 and list(rows["caption"][:3]) and rows["image"].iloc[0] == pairs.ids[3]
    assert rows["caption"].iloc[0] in pairs.captions[3] and rows["score"].is_monotonic_decreasing


def test_ask_page_answers_from_the_collection_with_weighted_evidence(app_env, tiny_world):
    from clipdex.data_manifests.pairs import load_pairs

    pairs = load_pairs(tiny_world, split="corpus")
    at = _open("ask")
    at.radio(key="ask_source").set_value("Pick from the collection").run()
    at.selectbox(key="ask_pick_id").set_value(pairs.ids[5]).run()
    at.text_input(key="ask_question").input("how many shapes are there?")
    at.button[0].click().run()  # the form's "Ask"
    assert not at.exception and not at.error
    assert [s.value for s in at.subheader] == ["Answer", "Evidence"]
    answer = at.success[0].value.strip("*")
    assert answer and answer != "(empty answer)"
    assert "how many shapes are there?" in " ".join(c.value for c in at.caption)
    rows = at.dataframe[0].value
    assert len(rows) == 5 and list(rows["rank"]) == [1, 2, 3, 4, 5] and rows["score"].is_monotonic_decreasing
    assert rows["image"].iloc[0] == pairs.ids[5]  # the picked image retrieves itself first
    assert ((rows["weight"] >= 0) & (rows["weight"] <= 1)).all() and rows["weight"].sum() <= 1.0001
    assert list(rows[""]).count("answer rests on this") == 1
    assert rows[""].iloc[int(rows["weight"].idxmax())] == "answer rests on this"
    assert len(at.get("image")) == 1 + 5  # the query image, then the 5 evidence images


def test_bad_uploads_show_an_error_and_a_good_one_searches(app_env, monkeypatch):
    monkeypatch.setenv("CLIPDEX_APP_MAX_PIXELS", "10000")
    at = _open()
    at.radio(key="direction").set_value("image → image").run()
    for name, data, message in [("notes.png", b"not an image", "is not a JPEG, PNG"),
                                ("bomb.png", _png((200, 200)), "decompression bomb")]:
        at.file_uploader(key="search_upload").set_value((name, data, "image/png")).run()
        assert not at.exception and len(at.error) == 1
        assert at.error[0].value.startswith("Upload refused") and message in at.error[0].value
        assert not [c for c in at.caption if " results in " in c.value]  # no search with a refused upload
    at.file_uploader(key="search_upload").set_value(("red.png", _png((64, 64)), "image/png")).run()
    assert not at.error and _results(at)[0] == 12


def test_collection_page_shows_counts_index_recall_and_report(app_env):
    at = _open("collection")
    (table,) = [d.value for d in at.dataframe if "collection" in d.value.columns]
    assert table.to_dict("records") == [{"collection": "world", "images": 64, "captions": 320,
                                         "model": "clipdex-world", "embedding size": 256}]
    assert [m.value for m in at.metric][:2] == ["64", "320"]
    (indexes,) = [d.value for d in at.dataframe if "index type" in d.value.columns]
    assert list(indexes["index type"]) == ["Flat", "Flat"] and list(indexes["vectors"]) == [64, 320]
    assert any("No file was skipped" in c.value for c in at.caption)
    (measure,) = [b for b in at.button if b.label.startswith("Measure recall against")]
    measure.click().run()
    (recall,) = [d.value for d in at.dataframe if "recall@10" in d.value.columns]
    assert list(recall["direction"]) == ["text → image", "image → text"]
    assert float(recall["recall@10"].iloc[0]) >= 0.9  # the shipped model on 64 of its own kind of scenes


@pytest.mark.slow
def test_index_a_folder_from_the_collection_page(tiny_world, tmp_path, monkeypatch):
    photos, db = tmp_path / "photos", tmp_path / "db"
    photos.mkdir()
    for p in sorted((tiny_world.parent / "images" / "test").rglob("*.jpg"))[:6]:
        shutil.copy(p, photos / p.name)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (photos / "notes.txt").write_text("not an image")
    monkeypatch.setenv("CLIPDEX_APP_DB", str(db))
    monkeypatch.setenv("CLIPDEX_APP_INDEX_ROOTS", str(tmp_path))
    at = _open("collection")
    assert "No collection yet" in at.info[0].value and not db.exists()  # looking creates nothing

    at.text_input(key="index_folder").input("/etc")
    at.button[0].click().run()
    assert "outside the folders this app may index" in at.error[0].value and not db.exists()

    at.text_input(key="index_folder").input(str(photos))
    at.text_input(key="index_target").input("photos")
    at.button[0].click().run()
    saw_progress, deadline = False, time.monotonic() + 180
    while not at.success and time.monotonic() < deadline:
        saw_progress |= bool(at.get("progress"))
        time.sleep(0.5)
        at.run()
    assert not at.exception and at.success, [e.value for e in at.error]
    assert saw_progress and "6 new" in at.success[0].value and "1 skipped" in at.success[0].value
    (skipped,) = [d.value for d in at.dataframe if "reason" in d.value.columns]
    assert list(skipped["path"]) == [str(photos / "broken.jpg")]

    at.switch_page("pages/search.py").run()  # the new collection is selected and searchable
    assert at.sidebar.selectbox(key="collection").value == "photos"
    at.text_input(key="search_text").input("a red circle").run()
    assert _results(at)[0] == 6 and all(Path(h).parent == photos for h in _hit_ids(at))
