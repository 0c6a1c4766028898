"""Shared fixtures: a tiny generated world (made once per session), its indexed collection, and the CLI
runners: in process (most tests) and in a real subprocess (what only a process shows)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several workers: one thread each, for its CLI processes too
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = "1"


# The files that take longest (as `pytest --durations` measured them), first: the suite runs whole files on two
# workers (--dist loadfile, --no-loadscope-reorder: in this order), and a long file started last would leave the
# other worker idle at the end. The rest keep their order.
LONGEST_FIRST = ("test_answer.py", "test_ray_engine.py", "test_serve.py", "test_cli_long.py", "test_train.py",
                 "test_app_browser.py", "test_index.py", "test_reliability.py", "test_onnx_runtime.py", "test_cli.py",
                 "test_position.py", "test_app.py", "test_rerank.py")


def pytest_configure(config) -> None:
    """One ONNX export cache (CLIPDEX_CACHE) for the whole session, made by the first process (the xdist workers,
    started after this, and every CLI process inherit it): each model's text tower is exported once per session
    (``--runtime auto``, the default, makes it), and nothing lands in ~/.cache."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        import tempfile

        os.environ["CLIPDEX_CACHE"] = tempfile.mkdtemp(prefix="clipdex-test-cache-")


def pytest_unconfigure(config) -> None:
    """Remove the session's export cache (the process that made it)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        import shutil

        shutil.rmtree(_session_cache(), ignore_errors=True)


def _session_cache() -> Path:
    """The session's export cache (see :func:`pytest_configure`)."""
    return Path(os.environ["CLIPDEX_CACHE"])


def pytest_collection_modifyitems(items) -> None:
    """Put the tests of :data:`LONGEST_FIRST`'s files first, in its order (a stable sort: each file's own order
    is kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A small world: 800 train, 200 test, 60 corpus, 4 landmarks; returns the manifest path."""
    from clipdex.data_manifests.world.generate import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(WorldConfig(seed=3, train=800, test=200, corpus=60, landmarks=4, views_per_landmark=2,
                               image_size=64, workers=2), out_dir=out, progress=False)
    return out / "manifest.parquet"


def run_cli_subprocess(*args: str, check: bool = True, timeout: float = 300, cwd: Path | None = None,
                       env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real ``clipdex`` CLI in a subprocess, as a user would: for what only a process shows (start-up,
    exit codes as the shell sees them, signals). Returns the finished process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "clipdex", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"clipdex {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def kill_after_rows(proc: subprocess.Popen, *, db: Path, table: str, rows: int, timeout: float = 180,
                    before_kill=None) -> int | None:
    """SIGKILL ``proc`` (an index run) once LanceDB table ``table`` of ``db`` holds at least ``rows`` committed rows
    and wait for it; returns the rows it had, or None when it ended (or ``timeout`` passed) first.
    ``before_kill()`` runs just before the signal (to note the processes it has)."""
    import lancedb

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            n = lancedb.connect(str(db)).open_table(table).count_rows()
        except Exception:  # noqa: BLE001 - the table may not exist yet
            n = 0
        if n >= rows:
            if before_kill:
                before_kill()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return n
        time.sleep(0.02)
    proc.wait()
    return None


@dataclass
class CliResult:
    """What an in-process CLI run printed and returned (the fields a finished process has)."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, check: bool = True, cwd: Path | None = None) -> CliResult:
    """Run ``clipdex.cli.main(args)`` in this process (no interpreter start-up, models stay imported), with its
    stdout, stderr and log records captured; argparse's exits become the return code."""
    from clipdex.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse: --help exits 0, a usage error 2
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(here)
        root.removeHandler(handler)
    result = CliResult(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"clipdex {' '.join(args)} exited {code}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def app_db(tiny_world, tmp_path_factory) -> Path:
    """The tiny world's corpus split (64 images, 5 captions each) indexed in one run into collection ``world``
    of a fresh database; returns the database folder. The app's pages search it; tests/test_index.py copies it
    (two collections in one database) and compares a killed-and-resumed run's rows with it. Tests only read it."""
    from clipdex.indexer.runner import IndexSettings, run_index

    db = tmp_path_factory.mktemp("app") / "db"
    run_index(IndexSettings(source=str(tiny_world), split="corpus", db=str(db), collection="world"), progress=False)
    return db


@pytest.fixture(scope="session")
def world_db(tiny_world, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny world's test split (200 images, 5 captions each) indexed by ``clipdex index --json`` into
    collection ``world`` of a fresh database; returns the database folder and the run's JSON summary. Tests
    only read it (a re-index of the same split is a no-op)."""
    import json

    db = tmp_path_factory.mktemp("db")
    summary = json.loads(run_cli("index", str(tiny_world), "--db", str(db), "--split", "test", "--collection",
                                 "world", "--json").stdout)
    return db, summary


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> dict:
    """A tiny fused decoder (d_model 64, 2 layers, 200 steps) trained by ``clipdex train-decoder`` on a small
    landmark-heavy world of its own seed; returns ``root`` (its folder), ``decoder`` (the checkpoint) and
    ``record`` (the command's JSON). The steps and the world's size are what its answer-accuracy thresholds
    in tests/test_answer.py were measured with: keep them."""
    import json

    root = tmp_path_factory.mktemp("answer")
    out = root / "decoder.safetensors"
    proc = run_cli("train-decoder", "--out", str(out), "--world-dir", str(root / "train-world"), "--seed", "5",
                   "--corpus", "80", "--landmarks", "40", "--views", "2", "--steps", "200", "--batch-size", "16",
                   "--lr", "3e-3", "--d-model", "64", "--layers", "2", "--heads", "2", "--eval-every", "200",
                   "--k", "3", "--mix", "0.8,0.1,0.1", "--json")
    return {"root": root, "decoder": out, "record": json.loads(proc.stdout.strip().splitlines()[-1])}


@pytest.fixture(scope="session")
def shipped_encoder():
    """The embedded default encoder (clipdex-world) on the CPU, loaded once."""
    from clipdex.retrieval.models.encoder import load_encoder

    return load_encoder("clipdex-world", device="cpu")
