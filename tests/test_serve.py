"""``clipdex serve``: the real HTTP server on a free loopback port (uvicorn in a thread of this process, and in
a subprocess where only a process shows the behaviour: SIGTERM), driven with ``requests``: every endpoint,
every error status, auth on and off, clip-retrieval's protocol as its client sends it, concurrent requests,
and shutdown with an index job running."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import run_cli

TOKEN = "test-token-0123456789abcdef"


class Running:
    """A server over ``settings`` in a thread of this process, on a free port."""

    def __init__(self, settings):
        import uvicorn

        from clipdex.server.api import create_app
        from clipdex.server.state import ServerState

        self.state = ServerState(settings)
        config = uvicorn.Config(create_app(self.state), host="127.0.0.1", port=0, log_level="warning",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started and time.time() < deadline and self.thread.is_alive():
            time.sleep(0.05)
        assert self.server.started, "the server did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(world_db, tmp_path_factory):
    """A copy of the indexed tiny world (collection ``world``) served without a token; an index root holding a
    folder of 12 of its images (``root/pics``); uploads up to 1 MB."""
    from clipdex.server.settings import ServeSettings

    base = tmp_path_factory.mktemp("serve")
    db = base / "db"
    shutil.copytree(world_db[0], db)
    root = base / "root"
    (root / "pics").mkdir(parents=True)
    images = sorted(Path(p) for p in _paths(db))[:12]
    for p in images:
        shutil.copy(p, root / "pics" / p.name)
    running = Running(ServeSettings(db=str(db), index_roots=(str(root),), max_upload_mb=1, device="cpu",
                                    recheck_seconds=0.2))
    running.db, running.root, running.images = db, root, images
    yield running
    running.stop()


def _paths(db: Path) -> list[str]:
    from clipdex.retrieval.store.record import Database

    return Database(db).open("world").rows(columns=("path",))["path"].to_pylist()


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_health_collections_and_docs(served):
    assert requests.get(served.url + "/health").json()["status"] == "ok"
    cols = requests.get(served.url + "/collections").json()["collections"]
    world = next(c for c in cols if c["name"] == "world")
    assert world["images"] == 200 and world["captions"] == 1000 and world["model"] == "clipdex-world"
    assert world["index"]["images"]["factory"] == "Flat" and world["index"]["images"]["recall_at_10_vs_exact"] == 1.0
    schema = requests.get(served.url + "/openapi.json").json()
    assert {"/search", "/ask", "/index", "/jobs/{job_id}", "/knn-service", "/indices-list"} <= set(schema["paths"])
    assert "application/json" in schema["paths"]["/search"]["post"]["requestBody"]["content"]
    assert "swagger" in requests.get(served.url + "/docs").text.lower()


def test_text_search_matches_the_library_and_the_cli(served):
    r = requests.post(served.url + "/search", json={"text": "a red circle", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    cli = json.loads(run_cli("search", "a red circle", "--db", str(served.db), "--collection", "world", "-k", "5",
                             "--json").stdout)
    assert [h["id"] for h in body["results"]] == [h["id"] for h in cli["results"]]
    for mine, theirs in zip(body["results"], cli["results"]):
        assert {k: mine[k] for k in theirs} == theirs  # the CLI's fields, unchanged
        assert mine["thumbnail"].endswith("?size=192") and "/images/world/" in mine["url"]
    assert body["kind"] == "text->image" and body["rerank"]["used"] is False


def test_a_text_search_answers_the_same_on_the_batchers_worker_and_in_a_request_thread(served, monkeypatch):
    """A plain text search runs on the batcher's worker (no request thread) when its collection was checked
    lately, in a request thread otherwise: the same JSON either way. A filtered one always takes a thread (its
    LanceDB pre-filter must not hold the worker up), and its filter holds."""
    state = served.state
    loaded = state.collection("world")
    submit, thens = state.text_batcher.submit, []

    def spy(encoder, text, *, then=None):
        thens.append(then is not None)
        return submit(encoder, text, then=then)

    monkeypatch.setattr(state.text_batcher, "submit", spy)
    text = "a green triangle above a red square"
    query = {"text": text, "k": 7, "min_score": -1.0}
    monkeypatch.setattr(state, "fresh_collection", lambda name: loaded)
    on_worker = requests.post(served.url + "/search", json=query)
    top = on_worker.json()["results"][0]["id"]
    filtered = requests.post(served.url + "/search", json=query | {"where": f"id != '{top}'"})
    monkeypatch.setattr(state, "fresh_collection", lambda name: None)
    in_thread = requests.post(served.url + "/search", json=query)
    assert thens == [True, False, False]
    assert on_worker.status_code == in_thread.status_code == filtered.status_code == 200, on_worker.text
    assert on_worker.json() == in_thread.json() and len(on_worker.json()["results"]) == 7
    assert on_worker.headers["content-type"] == "application/json"
    assert top not in [h["id"] for h in filtered.json()["results"]]
    assert [h["id"] for h in filtered.json()["results"]][:6] == [h["id"] for h in on_worker.json()["results"]][1:]


def test_image_queries_upload_base64_and_id(served):
    img = served.images[0]
    own = served.state.collection("world").ids[served.state.collection("world").paths.index(str(img))]
    multipart = requests.post(served.url + "/search", files={"image": (img.name, img.read_bytes())}, data={"k": "3"})
    as_json = requests.post(served.url + "/search", json={"image": _b64(img), "k": 3})
    by_id = requests.post(served.url + "/search", json={"image_id": own, "k": 3})
    for r in (multipart, as_json, by_id):
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["id"] == own and r.json()["kind"] == "image->image"
    assert [h["id"] for h in multipart.json()["results"]] == [h["id"] for h in by_id.json()["results"]]
    caps = requests.post(served.url + "/search", json={"image_id": own, "k": 2, "target": "captions"}).json()
    assert caps["kind"] == "image->text" and caps["results"][0]["image_id"] == own
    vec = served.state.collection("world").search.embed_text("a blue square")
    r = requests.post(served.url + "/search", json={"vector": vec.tolist(), "k": 3}).json()
    text = requests.post(served.url + "/search", json={"text": "a blue square", "k": 3}).json()
    assert [h["id"] for h in r["results"]] == [h["id"] for h in text["results"]]


def test_images_and_thumbnails(served):
    col = served.state.collection("world")
    image_id, path = col.ids[0], col.paths[0]
    r = requests.get(f"{served.url}/images/world/{image_id}")
    assert r.status_code == 200 and r.content == Path(path).read_bytes()
    assert r.headers["content-type"] == "image/jpeg" and r.headers["x-content-type-options"] == "nosniff"
    t = requests.get(f"{served.url}/images/world/{image_id}?size=32")
    import io

    from PIL import Image

    assert t.headers["content-type"] == "image/png" and max(Image.open(io.BytesIO(t.content)).size) == 32
    assert requests.get(f"{served.url}/images/world/{image_id}?size=5000").status_code == 400
    assert requests.get(f"{served.url}/images/world/no-such-id").status_code == 404
    assert requests.get(f"{served.url}/images/nope/{image_id}").status_code == 404


def test_ask_answers_with_evidence(served):
    img = served.images[1]
    r = requests.post(served.url + "/ask", files={"image": (img.name, img.read_bytes())},
                      data={"question": "what colour is the circle?", "k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] and len(body["evidence"]) == 3
    assert abs(sum(e["weight"] for e in body["evidence"]) - 1) < 0.05 or all(e["weight"] <= 1 for e in body["evidence"])
    assert body["evidence"][0]["url"].startswith(served.url)
    cli = json.loads(run_cli("ask", "--image", str(img), "what colour is the circle?", "--db", str(served.db),
                             "--collection", "world", "-k", "3", "--json").stdout)
    assert body["answer"] == cli["answer"] and [e["id"] for e in body["evidence"]] == [e["id"] for e in cli["evidence"]]
    assert requests.post(served.url + "/ask", json={}).status_code == 400


@pytest.mark.parametrize("body,field", [
    ({"text": "x", "k": 0}, "k"),
    ({"txt": "x"}, "txt"),
    ({"text": "x", "image_id": "y"}, "exactly one"),
    ({"image": "not base64!"}, "image"),
    ({"text": "   "}, "blank"),
    ({"text": "x", "target": "captions"}, "target"),
    ({"vector": [0.1, 0.2]}, "dimensions"),
    ({"text": "x", "k": 5000}, "k"),
])
def test_bad_input_is_400_naming_the_field(served, body, field):
    r = requests.post(served.url + "/search", json=body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"] and "Traceback" not in r.text


def test_error_statuses(served):
    u = served.url
    assert requests.post(u + "/search", data="{not json").status_code == 400
    assert requests.post(u + "/search", json={"text": "x", "collection": "nope"}).status_code == 404
    assert requests.get(u + "/nothing").json()["status"] == 404
    assert requests.get(u + "/search").status_code == 405
    big = requests.post(u + "/search", json={"image": "A" * (3 * 2**20)})
    assert big.status_code == 413 and "over" in big.json()["error"]
    chunked = requests.post(u + "/search", data=iter([b'{"image": "', b"A" * (2 * 2**20), b'"}']))
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    assert requests.get(u + "/collections?" + "x" * 5000).status_code == 414
    assert requests.post(u + "/index", json={"folder": "/etc"}).status_code == 403
    assert requests.post(u + "/index", json={"folder": str(served.root / "missing")}).status_code == 400
    mismatch = requests.post(u + "/index", json={"folder": str(served.root / "pics"), "collection": "world",
                                                 "model": "clipdex-tiny:random"})
    assert mismatch.status_code == 422 and "clipdex-world" in mismatch.json()["error"]
    assert requests.get(u + "/jobs/nope").status_code == 404


def test_an_index_job_runs_and_its_collection_is_then_searchable(served):
    u = served.url
    r = requests.post(u + "/index", json={"folder": str(served.root / "pics"), "collection": "pics"})
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    deadline = time.time() + 120
    while (state := requests.get(f"{u}/jobs/{job['id']}").json())["running"] and time.time() < deadline:
        time.sleep(0.2)
    assert state["error"] is None and state["summary"]["counts"]["indexed"] == 12, state
    assert state["done"] == state["total"] == 12
    time.sleep(0.3)  # past recheck_seconds: the new collection is listed
    hits = requests.post(u + "/search", json={"text": "a red circle", "collection": "pics", "k": 3}).json()
    assert len(hits["results"]) == 3 and all(h["path"].startswith(str(served.root)) for h in hits["results"])


def test_a_collection_reopens_when_another_process_changes_it(served):
    n = requests.get(served.url + "/collections").json()["collections"]
    before = next(c for c in n if c["name"] == "world")["images"]
    extra = served.root / "more"
    extra.mkdir()
    shutil.copy(served.images[0], extra / "copy-of-first.jpg")
    run_cli("index", str(extra), "--db", str(served.db), "--collection", "world", "--model", "clipdex-world",
            "--workers", "0", "--json")
    time.sleep(0.3)
    after = next(c for c in requests.get(served.url + "/collections").json()["collections"] if c["name"] == "world")
    assert after["images"] == before + 1


def test_clip_retrieval_protocol_as_its_client_sends_it(served):
    """Bodies exactly as clip_retrieval.clip_client.ClipClient posts them: json.dumps into data= (no
    Content-Type), every field present, the safety flags on."""
    u = served.url
    assert requests.get(u + "/indices-list").json() == sorted(requests.get(u + "/indices-list").json())
    assert "world" in requests.get(u + "/indices-list").json()

    def client(**query):
        body = {"text": None, "image": None, "image_url": None, "embedding_input": None, "deduplicate": True,
                "use_safety_model": True, "use_violence_detector": True, "indice_name": "world", "use_mclip": False,
                "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 5,
                "num_result_ids": 5, "verbose": False}
        body.update(query)
        r = requests.post(u + "/knn-service", data=json.dumps(body), timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    ours = requests.post(u + "/search", json={"text": "a red circle", "collection": "world", "k": 5}).json()["results"]
    theirs = client(text="a red circle", deduplicate=False)
    assert [h["id"] for h in theirs] == [h["id"] for h in ours]
    assert all(set(h) >= {"id", "similarity", "caption", "url"} for h in theirs)
    assert abs(theirs[0]["similarity"] - ours[0]["score"]) < 1e-6 and theirs[0]["caption"]
    img = served.images[2]
    by_image = client(image=_b64(img))
    assert by_image[0]["path"] == str(img)
    by_url = client(image_url=by_image[0]["url"])
    assert by_url[0]["id"] == by_image[0]["id"]
    vec = served.state.collection("world").search.embed_text("a red circle")
    assert [h["id"] for h in client(embedding_input=vec.tolist(), deduplicate=False)] == [h["id"] for h in ours]
    texts = client(text="a red circle", modality="text")
    assert all("#" in h["id"] and h["caption"] and h["image_id"] for h in texts)
    meta = requests.post(u + "/metadata", data=json.dumps({"ids": [theirs[0]["id"], texts[0]["id"], "nope"],
                                                           "indice_name": "world"})).json()
    assert meta[0]["metadata"]["caption"] == theirs[0]["caption"] and meta[1]["metadata"]["caption"] == texts[0]["caption"]
    assert meta[2] == {"id": "nope", "metadata": {}}
    r = requests.post(u + "/knn-service", data=json.dumps({"image_url": "http://example.com/a.jpg", "modality": "image",
                                                           "num_images": 3, "indice_name": "world"}))
    assert r.status_code == 400 and "fetches nothing" in r.json()["error"]


def test_near_duplicates_follow_clip_retrieval_groups():
    from clipdex.server.clip_compat import near_duplicates

    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.95, 0.312, 0.0])  # cos(a, b) 0.95
    c = np.array([0.81, 0.586, 0.0])  # cos(b, c) 0.95, cos(a, c) 0.81: one group through b
    d = np.array([0.0, 0.0, 1.0])
    v = np.stack([x / np.linalg.norm(x) for x in (a, b, c, d)])
    assert near_duplicates(v) == {1, 2}


def test_concurrent_requests_agree_with_sequential_ones(served):
    queries = ["a red circle", "a blue square", "two green stars", "a yellow hexagon"] * 4
    want = {q: requests.post(served.url + "/search", json={"text": q, "k": 5, "collection": "world"}).json()["results"] for q in set(queries)}
    got, errors = {}, []

    def worker(i):
        try:
            with requests.Session() as s:
                for q in queries[i::8]:
                    r = s.post(served.url + "/search", json={"text": q, "k": 5, "collection": "world"}, timeout=60)
                    got.setdefault(q, []).append(r.json()["results"] if r.status_code == 200 else r.text)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sum(len(v) for v in got.values()) == len(queries)
    for q, answers in got.items():
        assert all([h["id"] for h in a] == [h["id"] for h in want[q]] for a in answers)


def test_a_token_is_required_when_set(world_db):
    from clipdex.server.settings import ServeSettings

    running = Running(ServeSettings(db=str(world_db[0]), token=TOKEN, device="cpu"))
    try:
        u = running.url
        assert requests.get(u + "/health").status_code == 200  # liveness needs no token
        assert requests.get(u + "/openapi.json").status_code == 200
        no = requests.get(u + "/collections")
        assert no.status_code == 401 and no.headers["www-authenticate"] == "Bearer"
        assert requests.get(u + "/collections", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert requests.post(u + "/knn-service", data="{}").status_code == 401
        ok = requests.get(u + "/collections", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["collections"][0]["name"] == "world"
    finally:
        running.stop()


def test_serving_other_machines_needs_a_token(world_db, tmp_path):
    r = run_cli("serve", "--db", str(world_db[0]), "--host", "0.0.0.0", check=False)
    assert r.returncode == 1 and "--token-file" in r.stderr
    short = tmp_path / "token"
    short.write_text("short\n")
    r = run_cli("serve", "--db", str(world_db[0]), "--host", "0.0.0.0", "--token-file", str(short), check=False)
    assert r.returncode == 1 and "at least 16" in r.stderr
    r = run_cli("serve", "--db", str(tmp_path / "none"), check=False)
    assert r.returncode == 1 and "no database" in r.stderr


@pytest.mark.slow
def test_sigterm_stops_within_5_s_and_leaves_no_job_half_written(tiny_world, tmp_path):
    """A subprocess server indexing 200 images in batches of 64 refuses a second job into the same collection
    (409), then gets SIGTERM mid-job: it exits within 5 s having committed the batches it embedded, the
    collection checks clean, and a re-run indexes exactly the rest (nothing lost, nothing twice)."""
    pics = tmp_path / "root" / "pics"
    pics.mkdir(parents=True)
    for i, src in enumerate(sorted((tiny_world.parent / "images" / "test").rglob("*.jpg"))):
        (pics / f"{i:03d}.jpg").write_bytes(src.read_bytes())  # 200 files, 4 batches: mid-run after the first
    db = tmp_path / "db"
    db.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "clipdex", "serve", "--db", str(db), "--port", "0", "--device",
                             "cpu", "--index-root", str(tmp_path / "root")], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        deadline = time.time() + 120
        while url is None and time.time() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
            if "listening on" in line:
                url = line.split("listening on ")[1].split()[0]
        assert url, "the server did not start"
        job = requests.post(url + "/index", json={"folder": str(pics), "collection": "pics"}).json()["job"]
        again = requests.post(url + "/index", json={"folder": str(pics), "collection": "pics"})
        assert again.status_code == 409 and job["id"] in again.json()["error"]  # one job per collection
        other = requests.post(url + "/index", json={"folder": str(pics / "none"), "collection": "other"})
        assert other.status_code == 400  # another collection may start (this folder is missing)
        while requests.get(f"{url}/jobs/{job['id']}").json()["done"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert requests.get(f"{url}/jobs/{job['id']}").json()["running"], "the job ended before the signal"
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        stopped = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert stopped < 5, stopped
    run_cli("check", "--db", str(db), "--collection", "pics")  # exits non-zero on any damage
    from clipdex.retrieval.store.record import Database

    kept = Database(db).open("pics").count()
    assert kept >= 64  # the batches embedded before the signal were committed
    from clipdex.app.jobs import IndexJobs
    from clipdex.indexer.runner import IndexSettings

    again = IndexJobs(per="collection").start(IndexSettings(source=str(pics), db=str(db), collection="pics",
                                                            workers=0), roots=(str(tmp_path / "root"),))
    again.thread.join(120)  # the server's own path again: the same listing, so the same source
    assert again.error is None, again.error
    n = len(list(pics.rglob("*.jpg")))
    assert again.summary["counts"]["unchanged"] == kept and again.summary["counts"]["indexed"] == n - kept
    from clipdex.retrieval.store.record import Database

    assert Database(db).open("pics").count() == n  # nothing lost, nothing twice
