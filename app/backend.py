"""What the pages share, loaded once per process with Streamlit's caches: the encoder, each collection
opened for search with its FAISS indexes, thumbnails, the index jobs, and the lock every model call takes
its turn under. Nothing here draws, except the spinners Streamlit shows while a cache fills.

A collection is cached under its LanceDB table versions, so rows added by an index run (from the
Collection page or the CLI) are searchable on the next page run, while the encoder stays loaded. Its files
are opened only where their real path lies under the app's folders: its index roots and the folders the
collection was indexed from (:attr:`LoadedCollection.roots`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import streamlit as st
from PIL import Image

from clipdex.app.collections import LoadedCollection, load_collection
from clipdex.app.inputs import InputError, decode_checked, read_confined
from clipdex.app.jobs import IndexJobs, listing_sidecar
from clipdex.app.settings import AppSettings
from clipdex.app.turns import FairLock, streamlit_superseded
from clipdex.exceptions import ClipdexError
from clipdex.retrieval.store.record import Collection, Database

THUMB_PX = 192


@st.cache_resource(show_spinner="Loading the model (once per process)...")
def encoder(spec: str, device: str):
    """The dual encoder for ``spec`` (shared by every collection indexed with it)."""
    from clipdex.retrieval.models.encoder import load_encoder

    return load_encoder(spec, device=device)


@st.cache_resource(show_spinner="Loading the answering decoder (once per process)...")
def decoder(path: str, device: str):
    """The built-in fused decoder (``path`` empty: the shipped one), shared by every session."""
    from clipdex.retrieval.answer.answerer import BuiltinBackend

    return BuiltinBackend(path or None, device=device)


@st.cache_resource(show_spinner="Opening the collection and its search indexes...", max_entries=8)
def _loaded(db: str, name: str, images_version: int, captions_version: int, device: str,
            index_roots: tuple[str, ...]) -> LoadedCollection:
    return load_collection(db, name, encoder=encoder(Database(db).open(name).encoder_info().spec, device),
                           index_roots=index_roots)


def source_label(source: str) -> str:
    """A source as the user named it (an app listing by its folder)."""
    sidecar = listing_sidecar(source)
    return sidecar["folder"] if sidecar is not None else source


def refused_files(source: str) -> list[dict]:
    """The files an app index run of ``source`` did not hand the indexer (links out of the roots), with why."""
    sidecar = listing_sidecar(source)
    return list(sidecar.get("refused", [])) if sidecar is not None else []


def database(cfg: AppSettings) -> Database | None:
    """The configured database, or None while it does not exist (nothing is created just by looking)."""
    return Database(cfg.db) if Path(cfg.db).is_dir() else None


def load(cfg: AppSettings, name: str) -> LoadedCollection:
    """``name`` ready for queries, reopened only when its tables changed. While the UI indexes into it, the
    last loaded state is used: its FAISS indexes are rebuilt once, by the index run itself."""
    db = str(Path(cfg.db).resolve())
    job = index_jobs().latest(db)
    if job is not None and job.running and job.settings.collection == name:
        if (db, name) not in _last_loaded():
            raise ClipdexError(f"collection {name!r} is being indexed; it can be searched when the run ends")
        return _last_loaded()[(db, name)]
    versions = Database(db).open(name).versions()
    loaded = _loaded(db, name, versions["images"], versions["captions"], cfg.device, tuple(cfg.index_roots))
    _last_loaded()[(db, name)] = loaded
    return loaded


@st.cache_resource
def _last_loaded() -> dict[tuple[str, str], LoadedCollection]:
    return {}


@st.cache_resource
def model_turns() -> FairLock:
    """The process's one lock for model calls: searches and answers of every session, first come first served."""
    return FairLock()


def timed(fn, *args, **kwargs) -> tuple:
    """Run a search or an answer in its turn (:mod:`clipdex.app.turns`); returns its result and the seconds
    it took, not counting the wait for its turn (shown on the page). A page whose session sent a newer
    request while it waited reruns with that one instead."""
    with model_turns().turn(superseded=streamlit_superseded()):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        return result, time.perf_counter() - t0


def collection_image(loaded: LoadedCollection, image_id: str, *, max_pixels: int) -> Image.Image:
    """The image of a collection row, opened only under the collection's roots and decoded with the same
    checks as an upload."""
    return loaded.image(image_id, max_pixels=max_pixels)


def thumbnail(loaded: LoadedCollection, path: str, *, max_pixels: int) -> Image.Image | None:
    """A square-ish thumbnail of a collection file (None if it is gone, unreadable or outside the
    collection's roots); cached per file version. Small images are enlarged with nearest-neighbour so their
    pixels stay crisp."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return None
    return _thumbnail(path, mtime, max_pixels, loaded.roots)


@st.cache_data(max_entries=4096, show_spinner=False)
def _thumbnail(path: str, mtime_ns: int, max_pixels: int, roots: tuple[Path, ...]) -> Image.Image | None:
    try:
        im = decode_checked(read_confined(path, roots=roots), label=path, max_pixels=max_pixels)
    except InputError:
        return None
    scale = THUMB_PX / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def last_index_report(cfg: AppSettings, name: str) -> dict | None:
    """The summary the last index run of ``name`` wrote (counts, timings, skipped files), if any."""
    path = Path(cfg.db) / "_reports" / f"{name}-last-index.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def disk_bytes(cfg: AppSettings, name: str) -> int:
    """Bytes the collection's tables and FAISS files take in the database folder."""
    db = Path(cfg.db)
    parts = [db / f"{name}__images.lance", db / f"{name}__captions.lance", *(db / "_faiss").glob(f"{name}__*")]
    return sum(f.stat().st_size for p in parts for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


def manifest_sources(col: Collection) -> list[tuple[str, str | None]]:
    """The (manifest, split) sources of a collection: the ones whose captions can measure its recall."""
    out = []
    for s in col.sources():
        manifest, _, split = s.partition("#split=")
        if Path(manifest).suffix.lower() in (".parquet", ".csv", ".jsonl", ".ndjson", ".json") \
                and listing_sidecar(s) is None:  # an app listing has no captions
            out.append((manifest, split or None))
    return out


@st.cache_data(show_spinner="Measuring recall on the collection's stored vectors...", max_entries=16)
def measured_recall(db: str, name: str, images_version: int, manifest: str, split: str | None,
                    gallery: int = 1000) -> dict:
    """Recall@1/5/10 both ways of the collection against its manifest (cached per table version)."""
    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.retrieval.evaluation.collection import evaluate_collection

    pairs = load_pairs(manifest, split=split)
    return evaluate_collection(Database(db).open(name), pairs, gallery=min(gallery, len(pairs)))


@st.cache_resource
def index_jobs() -> IndexJobs:
    """The process's index jobs (one running per database)."""
    return IndexJobs()
