"""Shared fixtures: a tiny generated world (made once per session) and the CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A small world: 800 train, 200 test, 60 corpus, 4 landmarks; returns the manifest path."""
    from clipdex.data_manifests.world.generate import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(WorldConfig(seed=3, train=800, test=200, corpus=60, landmarks=4, views_per_landmark=2,
                               image_size=64, workers=2), out_dir=out, progress=False)
    return out / "manifest.parquet"


def run_cli(*args: str, check: bool = True, timeout: float = 300, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real ``clipdex`` CLI in a subprocess (as a user would) and return the finished process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "clipdex", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"clipdex {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def app_db(tiny_world, tmp_path_factory) -> Path:
    """The tiny world's corpus split (64 images, 5 captions each) indexed into collection ``world`` of a fresh
    database, for the app's tests; returns the database folder."""
    from clipdex.indexer.runner import IndexSettings, run_index

    db = tmp_path_factory.mktemp("app") / "db"
    run_index(IndexSettings(source=str(tiny_world), split="corpus", db=str(db), collection="world"), progress=False)
    return db
