"""``clipdex index --engine ray`` on a local Ray cluster (started here: two CPUs, no network): the collection it
makes equals the local engine's, and it survives a killed run and a killed embed worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import kill_after_rows, run_cli

ray = pytest.importorskip("ray", reason="the dev extra installs Ray; without it this file cannot run")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the file's in-process runs (the engine joins it instead of starting its own)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _table(db: Path, collection: str, table: str) -> pa.Table:
    from clipdex.retrieval.store.record import Database

    col = Database(db).open(collection)
    return col.rows(columns=col.fragment_targets()[table][1].names, table=table).sort_by("id")


def _assert_same_collection(got_db: Path, want_db: Path, got: str, want: str) -> None:
    """The same rows (ids, every column, vectors and grids within float tolerance) and schema metadata."""
    for table in ("images", "captions"):
        a, b = _table(got_db, got, table), _table(want_db, want, table)
        assert a.schema.equals(b.schema, check_metadata=True), table
        assert a.num_rows == b.num_rows and a["id"].to_pylist() == b["id"].to_pylist(), table
        for name in a.column_names:
            if name == "vector":
                np.testing.assert_allclose(np.array(a[name].to_pylist()), np.array(b[name].to_pylist()), atol=1e-5)
            elif name == "grid":
                grids = [np.array([np.frombuffer(g, np.float16) for g in t[name].to_pylist()], np.float32)
                         for t in (a, b)]
                np.testing.assert_allclose(*grids, atol=2e-3)
            else:
                assert a[name].to_pylist() == b[name].to_pylist(), (table, name)


def _embed_actor_pids() -> list[int]:
    """Processes of the Ray engine's embed actors (Ray names a worker process after what it runs)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"_EmbedActor" in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.fixture()
def manifest(tiny_world, tmp_path) -> Path:
    """The tiny world's 64 corpus scenes (5 captions each; copies, so a test may change them) plus a corrupt file
    and a missing one."""
    world = pq.read_table(tiny_world, columns=["id", "path", "split", "captions"]).to_pylist()
    base, images = Path(tiny_world).parent, tmp_path / "images"
    images.mkdir()
    rows = []
    for r in world:
        if r["split"] == "corpus":
            copy = images / Path(r["path"]).name
            shutil.copy(base / r["path"], copy)
            rows.append({"id": r["id"], "path": str(copy), "captions": r["captions"]})
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    rows += [{"id": "bad/corrupt", "path": str(corrupt), "captions": ["a corrupt file"]},
             {"id": "bad/missing", "path": str(tmp_path / "gone.jpg"), "captions": ["a missing file"]}]
    out = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out


@pytest.mark.slow
def test_ray_engine_survives_a_killed_run_and_a_killed_worker_and_makes_the_local_engines_collection(
        manifest, tiny_world, ray_cluster, tmp_path):
    """A real ``clipdex index --engine ray`` process (joined to this file's cluster) SIGKILLed after two of its
    eight commits, its embed actor then ended by Ray; one file it indexed is then changed; the same command re-run
    in this process with its embed actor SIGKILLed after its first commit. The collection equals the local engine's
    from one uninterrupted run over the files as they now are (the changed file's old rows replaced): the same
    ids, vectors, grids, captions and schema metadata (nothing lost or doubled), the same failures for the corrupt
    and the missing file, the same search results in all three directions. (One flow: each Ray run starts an embed
    actor that loads the model, the suite's time budget allows few.)"""
    from clipdex.indexer.ray_engine import RayConfig
    from clipdex.indexer.runner import IndexSettings, run_index

    args = ["index", str(manifest), "--collection", "c", "--engine", "ray", "--batch-size", "8", "--flush-rows", "8",
            "--no-progress"]
    db = tmp_path / "ray"
    address = ray.get_runtime_context().gcs_address  # the driver joins this file's cluster, as on a real one
    proc = subprocess.Popen([sys.executable, "-m", "clipdex", *args, "--db", str(db), "--address", address],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = kill_after_rows(proc, db=db, table="c__images", rows=16)
    assert killed_at is not None and killed_at < 64, "the run finished before it could be killed"
    t0 = time.time()
    while _embed_actor_pids() and time.time() - t0 < 30:  # Ray ends the workers of a driver that died
        time.sleep(0.1)
    assert not _embed_actor_pids(), "the killed driver's embed actor outlived it"
    rows = pq.read_table(manifest).to_pylist()
    committed = set(_table(db, "c", "images")["id"].to_pylist())
    changed = next(r for r in rows if r["id"] in committed)
    other = min(Path(tiny_world).parent.glob("images/test/**/*.jpg"))  # a scene from outside the manifest
    shutil.copy(other, changed["path"])  # new content under the same id: its rows must be replaced, not doubled
    local = json.loads(run_cli("index", str(manifest), "--db", str(tmp_path / "local"), "--collection", "c",
                               "--workers", "0", "--json").stdout)  # decoding in this process: no worker to start

    killed, calls = [], []

    def kill_the_embed_actor(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2 and done < total:  # called once the plan is made, then after each commit: the first
            pids = _embed_actor_pids()
            assert pids, "no embed actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    settings = IndexSettings(source=str(manifest), db=str(db), collection="c", batch_size=8, flush_rows=8,
                             engine="ray", ray=RayConfig())
    summary = run_index(settings, progress=False, on_progress=kill_the_embed_actor)
    assert killed, "the embed actor was never killed"
    c = summary["counts"]
    assert summary["engine"]["name"] == "ray" and summary["engine"]["embed_actors"] == 1
    assert c["changed"] == 1 and killed_at - 1 <= c["unchanged"] < 64, c  # the killed run's other rows kept
    assert c["unchanged"] + c["indexed"] == 64, c
    assert c["images_in_collection"] == local["counts"]["images_in_collection"] == 64, c
    assert c["captions_in_collection"] == local["counts"]["captions_in_collection"] == 320, c
    assert sorted(map(str, summary["failures"])) == sorted(map(str, local["failures"]))
    reasons = {Path(f["path"]).name: f["reason"] for f in summary["failures"]}
    assert set(reasons) == {"corrupt.png", "gone.jpg"} and "not an image" in reasons["corrupt.png"], reasons
    _assert_same_collection(db, tmp_path / "local", "c", "c")
    for query in (["search", rows[3]["captions"][0]], ["search", "--image", rows[5]["path"]],
                  ["search", "--image", rows[5]["path"], "--captions"]):
        hits = [json.loads(run_cli(*query, "--db", str(tmp_path / e), "--collection", "c", "-k", "5",
                                   "--json").stdout) for e in ("local", "ray")]
        assert [h["id"] for h in hits[0]["results"]] == [h["id"] for h in hits[1]["results"]], query


def test_a_cluster_without_what_was_asked_is_refused_before_anything_is_created(tiny_world, ray_cluster, tmp_path):
    """GPUs the cluster lacks, or more embed actors than its CPUs leave room for: exit 1 naming the cause, and no
    database folder made."""
    db = tmp_path / "db"
    for extra, says in ((["--num-gpus-per-worker", "1"], "the Ray cluster has 0 GPUs"),
                        (["--embed-actors", "2"], "leave no CPU for decoding")):
        out = run_cli("index", str(tiny_world), "--split", "corpus", "--db", str(db), "--engine", "ray", *extra,
                      check=False)
        assert out.returncode == 1 and says in out.stderr, out.stderr
        assert not db.exists()
    bad = run_cli("index", str(tiny_world), "--db", str(db), "--engine", "ray", "--num-gpus-per-worker", "-1",
                  check=False)
    assert bad.returncode == 2 and "expected a number >= 0" in bad.stderr
