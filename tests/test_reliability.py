"""Faults a careful user meets: a second writer, a killed writer's lock and temp files, damaged FAISS and
LanceDB files, a read-only database and a full disk (real mounts, in a user namespace), duplicated rows,
random-init models. Each test failed on the clipdex before the fix it names (issue 13)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import run_cli

INDEX = ["--split", "corpus", "--collection", "world", "--workers", "0", "--no-progress"]


@pytest.fixture
def db(app_db, tmp_path) -> Path:
    """A private copy of the indexed corpus (64 images, collection ``world``) to damage."""
    out = tmp_path / "db"
    shutil.copytree(app_db, out)
    return out


def _search(db: Path, *args: str, check: bool = True):
    return run_cli("search", *args, "--db", str(db), "--collection", "world", "--json", check=check)


def _hold_lock(db: Path) -> subprocess.Popen:
    """A real process that takes the collection's writer lock and sleeps (killed by the test)."""
    code = ("import sys, time; from clipdex.retrieval.store.lock import writer_lock\n"
            f"with writer_lock({str(db)!r}, 'world'):\n    print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_holder_then_takes_a_dead_holders_lock(db, tiny_world):
    """Defect 1: two index runs into one collection both ran and duplicated every row."""
    holder = _hold_lock(db)
    try:
        p = run_cli("index", str(tiny_world), "--db", str(db), *INDEX, check=False)
        assert p.returncode == 1 and f"being written by pid {holder.pid}" in p.stderr and "--wait" in p.stderr, p.stderr
        t0 = time.monotonic()
        p = run_cli("index", str(tiny_world), "--db", str(db), *INDEX, "--wait", "0.5", check=False)
        assert p.returncode == 1 and "after waiting 0.5 s" in p.stderr and time.monotonic() - t0 >= 0.5
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel drops it
        holder.wait()
    out = json.loads(run_cli("index", str(tiny_world), "--db", str(db), *INDEX, "--json").stdout)
    assert out["counts"]["unchanged"] == 64 and out["counts"]["images_in_collection"] == 64


def test_waiting_writer_runs_once_the_first_finishes(db, tiny_world):
    holder = _hold_lock(db)
    try:
        import threading

        threading.Timer(1.0, holder.kill).start()
        out = json.loads(run_cli("index", str(tiny_world), "--db", str(db), *INDEX, "--wait", "60", "--json").stdout)
    finally:
        holder.wait()
    assert out["counts"]["images_in_collection"] == 64


def test_duplicate_rows_are_repaired_by_the_next_run(db, tiny_world):
    """Defect 1: rows duplicated by two old writers stayed for good ('64 unchanged')."""
    from clipdex.retrieval.store.record import Database

    col = Database(db).open("world")
    images, captions = col.rows(columns=col._images.schema.names), col.rows(columns=col._captions.schema.names,
                                                                          table="captions")
    col.append(images.slice(0, 10), captions.slice(0, 50))  # what a second concurrent run appended
    orphans = captions.slice(0, 7).to_pylist()
    for r in orphans:  # captions of an image a killed run never wrote (defect 6 counted these in images)
        r["id"], r["image_id"] = "gone/" + r["id"], "gone/" + r["image_id"]
    col.append(images.slice(0, 0), pa.Table.from_pylist(orphans, schema=captions.schema))
    assert len(col.duplicate_ids()) == 10
    p = run_cli("check", "--db", str(db), "--json", check=False)
    assert p.returncode == 1 and "10 rows repeat an id" in p.stdout
    out = json.loads(run_cli("index", str(tiny_world), "--db", str(db), *INDEX, "--json").stdout)
    assert out["repaired"] == {"duplicate_image_rows": 10, "duplicate_caption_rows": 50}
    assert out["counts"]["orphan_captions_dropped"] == 7
    assert out["counts"]["images_in_collection"] == 64 and out["counts"]["captions_in_collection"] == 320
    assert not col.duplicate_ids() and not col.duplicate_ids("captions")
    assert json.loads(run_cli("check", "--db", str(db), "--json").stdout)["ok"]


def _overwrite_middle(path: Path, fraction: float = 0.4, seed: int = 0) -> None:
    data = bytearray(path.read_bytes())
    n = int(len(data) * fraction)
    a = (len(data) - n) // 2
    data[a:a + n] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _faiss_file(db: Path, kind: str, table: str = "images") -> Path:
    """The index ('index') or ids ('rows') file the sidecar of ``world``'s ``table`` names."""
    sidecar = json.loads((db / "_faiss" / f"world__{table}.json").read_text())
    return db / "_faiss" / sidecar["files"][kind]


def test_damaged_faiss_file_is_detected_and_rebuilt(db, tiny_world, caplog):
    """Defect 2: random bytes inside the .faiss file gave 'cosine' scores near 5e37 and exit 0."""
    faiss_file = _faiss_file(db, "index")
    want = [r["id"] for r in json.loads(_search(db, "a red circle", "-k", "5").stdout)["results"]]
    _overwrite_middle(faiss_file)
    p = run_cli("check", "--db", str(db), check=False)
    assert p.returncode == 1 and f"{faiss_file}: the FAISS index differs from its checksum" in p.stdout, p.stdout
    out = json.loads(_search(db, "a red circle", "-k", "5").stdout)
    assert [r["id"] for r in out["results"]] == want and all(abs(r["score"]) <= 1.01 for r in out["results"])
    assert "rebuilding it from LanceDB" in caplog.text and str(faiss_file) in caplog.text
    assert run_cli("check", "--db", str(db)).returncode == 0  # the rebuilt files have matching checksums
    assert not faiss_file.exists()  # the damaged build's files went with it


def test_garbage_ids_file_is_reported_under_its_own_name(db):
    """Defect 10: a garbage ids file was reported under the .faiss file's name."""
    rows = _faiss_file(db, "rows")
    rows.write_bytes(b"not parquet at all" * 50)
    p = run_cli("check", "--db", str(db), check=False)
    assert p.returncode == 1 and f"problem: {rows}:" in p.stdout, p.stdout


def _data_file(db: Path, table: str) -> Path:
    files = sorted((db / f"world__{table}.lance" / "data").iterdir(), key=lambda f: f.stat().st_size)
    return files[-1]


def test_damaged_lance_data_is_found_by_check_and_never_shown_as_a_score(tmp_path, tiny_world):
    """Defect 3: random bytes inside a .lance data file: no error anywhere, filtered searches scored 6e37.
    Indexed without patch-token grids, so that the damaged middle of the file is vectors, not grid bytes (a
    search that reads no grid cannot see damage to them; clipdex check does, as for every byte)."""
    from clipdex.indexer.runner import IndexSettings, run_index

    db = tmp_path / "db"
    run_index(IndexSettings(source=str(tiny_world), split="corpus", db=str(db), collection="world", grids=False),
              progress=False)
    data = _data_file(db, "images")
    _overwrite_middle(data, fraction=0.6)
    p = run_cli("check", "--db", str(db), check=False)
    assert p.returncode == 1 and f"{data}: content differs from its recorded checksum" in p.stdout, p.stdout
    p = _search(db, "a red circle", "--where", "width >= 8", "-k", "64", check=False)
    assert p.returncode == 1 and "bad filter" not in p.stderr, p.stderr
    assert "damaged" in p.stderr and "clipdex check" in p.stderr, p.stderr


def test_truncated_lance_data_names_the_table_not_the_users_filter(db, tiny_world):
    """Defect 3: a truncated data file crashed index with a traceback naming no file, and made search --where
    say 'bad filter'."""
    data = _data_file(db, "images")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    p = _search(db, "a red circle", "--where", "width >= 8", check=False)
    assert p.returncode == 1 and "bad filter" not in p.stderr and "world__images" in p.stderr, p.stderr
    p = run_cli("index", str(tiny_world), "--db", str(db), *INDEX, "--rehash", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "world__images.lance" in p.stderr, p.stderr
    p = run_cli("check", "--db", str(db), check=False)
    assert p.returncode == 1 and f"{data}: " in p.stdout and "truncated" in p.stdout, p.stdout


def test_stale_temp_files_of_a_killed_faiss_write_are_removed(db, tiny_world):
    """Defect 5: a kill while FAISS was being written left .tmp files as large as an index, for good (and a
    build's files that no sidecar names, from a kill between them and the sidecar, go too)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leaked = db / "_faiss" / f".world__images.faiss.{dead.pid}-0123abcd.tmp"
    leaked.write_bytes(b"\0" * 4096)
    ours = db / "_faiss" / f".world__images.faiss.{os.getpid()}-0123abcd.tmp"  # a live writer's: kept
    ours.write_bytes(b"\0" * 10)
    orphan = db / "_faiss" / "world__images.0123456789ab.faiss"  # a build killed before its sidecar was written
    orphan.write_bytes(b"\0" * 4096)
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    run_cli("index", str(tiny_world), "--db", str(db), *INDEX)
    assert not leaked.exists() and ours.exists() and not orphan.exists()
    assert _faiss_file(db, "index").exists() and _faiss_file(db, "rows").exists()


@pytest.mark.filterwarnings("ignore:optimize\\(cleanup_older_than=0\\)")  # LanceDB's warning: no reader here
def test_commits_by_time_and_old_versions_pruned(tiny_world, tmp_path):
    """Defects 6 and 7: below 4,096 images a run made one commit, at the end; versions were never pruned
    (14 versions and 7 data files after four small incremental runs)."""
    from clipdex.indexer.runner import IndexSettings, run_index
    from clipdex.retrieval.models.encoder import load_encoder
    from clipdex.retrieval.store.record import Database

    db, encoder = tmp_path / "db", load_encoder("clipdex-world", device="cpu")
    settings = dict(source=str(tiny_world), split="corpus", db=str(db), collection="c", workers=0, batch_size=16,
                    build_index=False, keep_versions_seconds=0)
    out = run_index(IndexSettings(**settings, flush_seconds=0.0), progress=False, encoder=encoder)
    assert out["counts"]["indexed"] == 64
    col = Database(db).open("c")
    assert out["disk"]["images"]["versions"] == 1 and out["disk"]["images"]["data_files"] == 1, out["disk"]
    for _ in range(2):  # incremental runs that change nothing keep the store at one version
        out = run_index(IndexSettings(**settings), progress=False, encoder=encoder)
    assert col.disk_usage()["images"]["versions"] == 1
    listed = json.loads(run_cli("collections", "--db", str(db), "--json").stdout)["collections"][0]
    assert listed["disk_bytes"] == col.disk_usage()["bytes"] > 0


def test_the_writer_commits_every_flush_seconds(tiny_world, tmp_path):
    """Defect 6: the commit count of a small run with a time budget (a commit per batch at flush_seconds=0)."""
    from clipdex.indexer.reader import read_source
    from clipdex.indexer.writer import StoreWriter
    from clipdex.retrieval.models.encoder import EncoderInfo
    from clipdex.retrieval.store.record import Database

    info = EncoderInfo(spec="t", arch="t", embed_dim=4, image_size=8, context_length=77, mean=(0.5,), std=(0.5,))
    col = Database(tmp_path / "db", create=True).open_or_create("c", info=info)
    items = read_source(str(tiny_world), split="corpus").items[:6]
    writer = StoreWriter(col, source="s", flush_rows=100, flush_seconds=0.0)
    for it in items:
        writer.add(it, content_hash="h", width=8, height=8, vector=np.eye(4, dtype=np.float32)[0],
                   caption_vectors=np.tile(np.eye(4, dtype=np.float32)[0], (len(it.captions), 1)))
    assert writer.commits == 6 and col.count() == 6


_BUSY_WORKER = textwrap.dedent("""
    import os, sys, time
    from clipdex.indexer.decode import DecodePool
    from clipdex.indexer.reader import read_source

    def slow(im):  # a transform that keeps the worker busy mid-batch, like a folder of huge photos
        time.sleep(60)

    items = read_source(sys.argv[1], split="corpus").items[:4]
    with DecodePool(1) as pool:
        print(" ".join(str(p.pid) for p in pool.pool._pool), flush=True)
        next(pool.batches(items, slow, batch_size=2))
""")


def test_decode_workers_die_with_a_killed_indexer(tiny_world):
    """Defect 8: a decoding worker busy with its batch outlived a SIGKILLed indexer."""
    proc = subprocess.Popen([sys.executable, "-c", _BUSY_WORKER, str(tiny_world)], stdout=subprocess.PIPE, text=True)
    workers = [int(w) for w in proc.stdout.readline().split()]
    time.sleep(0.5)  # the worker is inside slow()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    # 5 s, well short of the 60 s the worker sleeps: a loaded machine (a fresh clone reading its venv from disk)
    # can take over a second to end a process that is inside an import
    while any(_running(w) for w in workers) and time.monotonic() - t0 < 5.0:
        time.sleep(0.02)
    alive = [w for w in workers if _running(w)]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert workers and not alive, f"workers {alive} outlived the killed indexer"


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_random_init_spec_is_reproducible_and_its_collection_searchable(tiny_world, tmp_path):
    """Defect 9: a collection indexed with clipdex-tiny:random could never be searched."""
    db = tmp_path / "db"
    run_cli("index", str(tiny_world), "--db", str(db), *INDEX, "--model", "clipdex-tiny:random", "--no-faiss")
    out = json.loads(run_cli("search", "a red circle", "--db", str(db), "--collection", "world", "--json").stdout)
    assert len(out["results"]) == 10


_NAMESPACE_SCRIPT = textwrap.dedent("""
    import json, subprocess, sys
    from clipdex.cli import main
    db, world, small = sys.argv[1:4]
    # 1. the database mounted read-only: search works (FAISS built in memory), index is refused
    subprocess.run(["mount", "--bind", "-o", "ro", db, db], check=True)
    print("SEARCH", main(["search", "a red circle", "--db", db, "--collection", "world", "--json"]), flush=True)
    print("INDEX", main(["index", world, "--db", db, "--split", "corpus", "--collection", "world", "--workers", "0",
                         "--no-progress"]), flush=True)
    # 2. a disk that fills mid-run: the commits made before it are kept, and the message says how many
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", small], check=True)
    code = main(["index", world, "--db", small + "/db", "--split", "corpus", "--collection", "c", "--workers", "0",
                 "--batch-size", "4", "--flush-rows", "4", "--no-faiss", "--no-progress"])
    from clipdex.retrieval.store.record import Database
    print("FULL", code, Database(small + "/db").open("c").count(), flush=True)
""")


def test_read_only_database_and_full_disk(db, tiny_world, tmp_path):
    """Defects 4 and 6, on real mounts (a user namespace: no root needed): a read-only database gave
    tracebacks (OSError: Read-only file system); a full disk lost the whole run below 4,096 images."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here (unshare -rm: {probe.stderr.decode().strip()})")
    shutil.rmtree(db / "_faiss")  # search must build the index, and cannot save it
    small = tmp_path / "small"
    small.mkdir()
    p = subprocess.run(["unshare", "-rm", sys.executable, "-c", _NAMESPACE_SCRIPT, str(db), str(tiny_world),
                        str(small)], capture_output=True, text=True, timeout=300)
    out, err = p.stdout, p.stderr
    assert "SEARCH 0" in out and "cannot save FAISS indexes" in err and "Traceback" not in err, err
    assert "INDEX 1" in out and f"the database folder {db} is read-only" in err, err
    full = next(line for line in out.splitlines() if line.startswith("FULL")).split()
    code, kept = int(full[1]), int(full[2])
    assert code == 1 and "disk full?" in err and f"This run committed {kept} images" in err, err
    assert 0 < kept < 64 and kept % 4 == 0  # whole commits of 4 kept; the run stopped where the disk filled


def test_nothing_to_index_exits_non_zero_and_creates_nothing(tiny_world, tmp_path):
    """§3: an empty folder, or a manifest whose files are all missing, exited 0 (and made an empty collection)."""
    empty, db = tmp_path / "empty", tmp_path / "db"
    empty.mkdir()
    p = run_cli("index", str(empty), "--db", str(db), check=False)
    assert p.returncode == 1 and "nothing to index" in p.stderr and "no image files" in p.stderr, p.stderr
    manifest = tmp_path / "gone.csv"
    manifest.write_text(f"path\n{tmp_path / 'a.jpg'}\n{tmp_path / 'b.jpg'}\n")
    p = run_cli("index", str(manifest), "--db", str(db), check=False)
    assert p.returncode == 1 and "none of its 2 files exist" in p.stderr and "a.jpg" in p.stderr, p.stderr
    assert not db.exists()


def test_reliability_md_names_only_tests_that_exist():
    """RELIABILITY.md's table points at the test that injects each fault: each must exist."""
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "RELIABILITY.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(named) >= 14
    for path, name in named:
        assert re.search(rf"^def {name}\(", (root / path).read_text(), re.M), f"{path}::{name} is gone"
    assert "`bench/faults.py`" in text and (root / "bench" / "faults.py").is_file()
