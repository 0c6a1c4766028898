"""The Streamlit app: input checks, the server command, and each page under Streamlit's AppTest against the
real backend (the tiny world's corpus indexed into a temporary database by the ``app_db`` fixture)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from clipdex.app.inputs import InputError, check_index_folder, check_upload, confine_listing, read_confined
from clipdex.exceptions import ClipdexError
from conftest import run_cli

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
        ("bomb.png", _png((200, 200)), "decompression bomb: 200x200 = 40,000 pixels, over the limit of 10,000"),
        ("cut.png", _png()[:60], "cannot be decoded"),  # truncated
    ]
    for name, data, message in cases:
        with pytest.raises(InputError, match=re.escape(message)) as e:
            check_upload(name, data, max_bytes=2**20, max_pixels=10_000)
        assert str(e.value).count("10,000") <= 1  # the limit is stated once


def test_one_pixel_limit_for_uploads_collection_files_and_folders_indexed_from_the_app():
    from clipdex.app.settings import AppSettings
    from clipdex.indexer.runner import IndexSettings
    from clipdex.retrieval.models.images import DEFAULT_MAX_PIXELS

    assert AppSettings.from_env({}).max_pixels == DEFAULT_MAX_PIXELS == IndexSettings(source="x").max_pixels
    assert AppSettings.from_env({"CLIPDEX_APP_MAX_PIXELS": "5000"}).max_pixels == 5000


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
    with pytest.raises(InputError, match="may index no folder: restart it with clipdex app --index-root DIR"):
        check_index_folder(str(root / "photos"), roots=(), db=str(db))  # no root named: nothing is indexable


def test_a_folder_listing_and_every_file_read_stay_inside_the_roots(tmp_path, tmp_path_factory):
    from clipdex.app.inputs import OUTSIDE, resolved_roots
    from clipdex.indexer.reader import read_folder

    outside = tmp_path_factory.mktemp("outside") / "photo.png"
    outside.write_bytes(_png())
    root = tmp_path / "root"
    (root / "f" / "sub").mkdir(parents=True)
    (root / "f" / "a.png").write_bytes(_png())
    (root / "other.png").write_bytes(_png(colour=(0, 0, 255)))
    (root / "f" / "x.jpg").symlink_to(outside)  # a link out of the root
    (root / "f" / "passwd.jpg").symlink_to("/etc/passwd")
    (root / "f" / "sub" / "in.png").symlink_to(root / "other.png")  # a link that stays inside: followed
    (root / "f" / "gone.png").symlink_to(root / "missing.png")
    roots = resolved_roots([root])
    items, refused = confine_listing(read_folder(root / "f"), roots=roots)
    assert {Path(i.id).name: i.path for i in items} == {"a.png": str((root / "f" / "a.png").resolve()),
                                                        "in.png": str((root / "other.png").resolve())}
    reasons = {Path(p).name: r for p, r in refused}
    assert reasons["x.jpg"] == OUTSIDE and reasons["passwd.jpg"] == OUTSIDE and "gone" in reasons["gone.png"]
    assert read_confined(str(root / "f" / "sub" / "in.png"), roots=roots) == (root / "other.png").read_bytes()
    for path, message in [(root / "f" / "x.jpg", "outside the folders this app may open"),
                          (root / "f" / "passwd.jpg", "outside the folders this app may open"),
                          (root / "f" / "gone.png", "is gone"), (root / "f" / "sub", "not a regular file")]:
        with pytest.raises(InputError, match=message):
            read_confined(str(path), roots=roots)


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
    assert flags["--runner.fastReruns"] == "false"  # one script run per session: a burst cannot pile up runs
    s = AppSettings(db="some/db", collection="c", index_roots=("/a", "/b"), max_upload_mb=7, password="s3cret-pw")
    assert AppSettings.from_env(s.as_env()) == AppSettings(db=str(Path("some/db").resolve()), collection="c",
                                                           index_roots=("/a", "/b"), max_upload_mb=7,
                                                           max_pixels=AppSettings.from_env({}).max_pixels,
                                                           password="s3cret-pw")
    assert "s3cret" not in repr(s) and AppSettings.from_env({}).index_roots == ()  # no root unless named


def test_app_serves_other_machines_only_with_a_password(tmp_path, monkeypatch):
    from clipdex.commands.app import check_exposure, read_password

    monkeypatch.delenv("CLIPDEX_APP_PASSWORD", raising=False)
    for host in ("0.0.0.0", "192.168.1.5", "::", "photos.example"):
        with pytest.raises(ClipdexError, match="set CLIPDEX_APP_PASSWORD or --password-file FILE"):
            check_exposure(host, password="")
    for host in ("127.0.0.1", "::1", "localhost"):
        check_exposure(host, password="")
    check_exposure("0.0.0.0", password="a long passphrase")
    with pytest.raises(ClipdexError, match="use at least 8"):
        check_exposure("127.0.0.1", password="short")
    (tmp_path / "pw").write_text("from the file\nignored\n")
    assert read_password(str(tmp_path / "pw"), env={"CLIPDEX_APP_PASSWORD": "env"}) == "from the file"
    assert read_password(None, env={"CLIPDEX_APP_PASSWORD": "from the env"}) == "from the env"
    r = run_cli("app", "--db", str(tmp_path / "db"), "--host", "0.0.0.0", check=False)  # refused before it starts
    assert r.returncode == 1 and "--host 0.0.0.0 serves other machines" in r.stderr


def test_model_calls_take_turns_first_come_first_served_and_a_superseded_wait_gives_up():
    import threading

    from clipdex.app.turns import FairLock

    class Superseded(BaseException):  # what Streamlit raises in a run whose session sent a newer request
        pass

    lock, order, newer = FairLock(), [], threading.Event()

    def replaced() -> None:
        if newer.is_set():
            raise Superseded

    def call(name: str, superseded) -> None:
        try:
            with lock.turn(superseded=superseded):
                order.append(name)
        except Superseded:
            order.append(f"{name} gave up")

    def until(condition) -> None:
        deadline = time.monotonic() + 5
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.005)

    threads = []
    with lock.turn():  # one session's call runs; the others queue in the order they come
        for name in ("b1", "c1", "a2", "d1", "e1"):
            threads.append(threading.Thread(target=call, args=(name, replaced if name == "a2" else None)))
            threads[-1].start()
            until(lambda: lock.waiting() == len(threads))
        newer.set()  # a2's session sent its next query: a2 leaves the queue before its turn
        until(lambda: order)
        assert order == ["a2 gave up"] and lock.waiting() == 4
    for t in threads:
        t.join(5)
    assert order == ["a2 gave up", "b1", "c1", "d1", "e1"] and lock.waiting() == 0


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
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _results(at) -> tuple[int, float]:
    """(count, milliseconds) from the page's "N results in X ms" line."""
    (line,) = [c.value for c in at.caption if " results in " in c.value]
    n, ms = re.match(r"(\d+) results in (\d+) ms", line).groups()
    return int(n), float(ms)


def _hit_ids(at) -> list[str]:
    return [b.key.split("_", 2)[2] for b in at.button if b.key and b.key.startswith("more_")]


def test_sign_in_comes_before_any_page(app_env, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CLIPDEX_APP_PASSWORD", "correct horse battery")
    at = AppTest.from_file(str(MAIN), default_timeout=120).run()
    assert [t.value for t in at.title] == ["clipdex"] and not at.sidebar.selectbox and not at.caption
    alone = AppTest.from_file(str(REPO / "app" / "views" / "collection.py"), default_timeout=120).run()
    assert not alone.title and not alone.dataframe  # a page run on its own stops too
    assert not (REPO / "app" / "pages").exists()  # Streamlit would serve app/pages/*.py by URL, past main.py
    at.text_input(key="sign_in_password").input("wrong horse battery")
    at.button[0].click().run()
    assert at.error[0].value == "Wrong password." and [t.value for t in at.title] == ["clipdex"]
    at.text_input(key="sign_in_password").input("correct horse battery")
    at.button[0].click().run()
    assert not at.exception and at.title[0].value == "Search"
    assert at.sidebar.selectbox(key="collection_picker").value == "world"


def test_search_page_text_to_image_filters_and_more_like_this(app_env, tiny_world):
    from clipdex.data_manifests.pairs import load_pairs

    pairs = load_pairs(tiny_world, split="corpus")
    path_of = dict(zip(pairs.ids, map(str, pairs.paths)))
    at = _open()
    assert at.title[0].value == "Search" and at.sidebar.selectbox(key="collection_picker").value == "world"
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


def test_upload_names_and_collection_paths_are_shown_as_plain_text(app_env, tiny_world):
    from clipdex.app.widgets import plain
    from clipdex.data_manifests.pairs import load_pairs

    name = "**bold** :red[red] $x^2$ [x](https:evil.example) <https:evil.example>.png"
    at = _open("ask")
    at.file_uploader(key="ask_upload").set_value((name, _png((64, 64)), "image/png")).run()
    assert name in [t.value for t in at.text]  # under the image, as plain text (not a Markdown caption)
    at.text_input(key="ask_question").input("what is it?")
    at.button[0].click().run()
    (about,) = [c.value for c in at.caption if c.value.startswith("You asked")]
    assert plain(name) in about  # inside a sentence: escaped
    kinds = ("markdown", "caption", "success", "error", "info", "warning")
    rendered = [e.value for kind in kinds for e in at.get(kind)]
    assert not [v for v in rendered if name in v]  # nowhere as Markdown
    picked = load_pairs(tiny_world, split="corpus").ids[2]
    at.radio(key="ask_source").set_value("Pick from the collection").run()
    at.selectbox(key="ask_pick_id").set_value(picked).run()
    assert picked in [t.value for t in at.text]


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
def test_index_a_folder_from_the_collection_page(tiny_world, tmp_path, tmp_path_factory, monkeypatch):
    from clipdex.app.inputs import OUTSIDE

    photos, db = tmp_path / "photos", tmp_path / "db"
    photos.mkdir()
    jpgs = sorted((tiny_world.parent / "images" / "test").rglob("*.jpg"))
    for p in jpgs[:6]:
        shutil.copy(p, photos / p.name)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (photos / "notes.txt").write_text("not an image")
    outside = tmp_path_factory.mktemp("outside") / "photo.jpg"  # not under the app's index root
    shutil.copy(jpgs[6], outside)
    os.utime(outside, (1e9, 1e9))
    (photos / "x.jpg").symlink_to(outside)
    (photos / "passwd.jpg").symlink_to("/etc/passwd")
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
    assert saw_progress and "6 new" in at.success[0].value and "3 skipped" in at.success[0].value
    (skipped,) = [d.value for d in at.dataframe if "reason" in d.value.columns]
    reasons = dict(zip(skipped["path"], skipped["reason"]))
    assert reasons.keys() == {str(photos / n) for n in ("broken.jpg", "x.jpg", "passwd.jpg")}
    assert reasons[str(photos / "x.jpg")] == reasons[str(photos / "passwd.jpg")] == OUTSIDE  # never opened

    at.switch_page("views/search.py").run()  # the new collection is selected and searchable
    assert at.sidebar.selectbox(key="collection_picker").value == "photos"
    at.text_input(key="search_text").input("a red circle").run()
    assert _results(at)[0] == 6 and all(Path(h).parent == photos for h in _hit_ids(at))
    assert not at.warning

    swapped = photos / jpgs[0].name  # an indexed file replaced by a link out of the root after indexing
    swapped.unlink()
    swapped.symlink_to(outside)
    at.run()
    assert [w.value for w in at.warning] == ["file missing, unreadable or outside the app's folders"]
    at.radio(key="direction").set_value("image → image").run()
    at.radio(key="search_source").set_value("Pick from the collection").run()
    at.selectbox(key="search_pick_id").set_value(str(swapped)).run()
    assert "outside the folders this app may open" in at.error[0].value and not at.get("image")
