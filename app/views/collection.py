"""Collection: the database's collections (images, captions, model), the selected one's index type, size
and measured recall, the last index run's skipped files, and indexing a folder with a live progress bar
(only under the app's ``--index-root`` folders; links out of them are listed as skipped, never opened)."""

import streamlit as st

from clipdex.app import backend, widgets
from clipdex.app.inputs import check_collection_name, check_index_folder
from clipdex.app.settings import AppSettings
from clipdex.app.widgets import plain
from clipdex.exceptions import ClipdexError
from clipdex.indexer.runner import IndexSettings
from clipdex.retrieval.models.registry import DEFAULT_MODEL

UI_BATCH = 64  # images per batch and per store append while indexing from the UI: the progress bar's step

cfg = AppSettings.from_env()
widgets.sidebar(cfg)
db = backend.database(cfg)
names = db.collections() if db else []
name = st.session_state.get("collection")

st.title("Collection")
st.caption(f"Database {plain(cfg.db)}")
if names:
    rows = []
    for n in names:
        col = db.open(n)
        info = col.encoder_info()
        rows.append({"collection": n, "images": col.count(), "captions": col.caption_count(),
                     "model": info.spec, "embedding size": info.embed_dim})
    st.dataframe(rows, hide_index=True)
else:
    st.info("No collection yet: index a folder below.")


def details(name: str) -> None:
    """The selected collection: model, index type and size, measured recall, skipped files."""
    try:
        loaded = backend.load(cfg, name)
    except ClipdexError as e:
        st.info(plain(e))
        return
    col = loaded.search.collection
    info = col.encoder_info()
    st.subheader(f"“{plain(name)}”")
    a, b, c, d = st.columns(4)
    a.metric("Images", f"{col.count():,}")
    b.metric("Captions", f"{col.caption_count():,}")
    c.metric("Model", plain(info.spec),
             help=plain(f"{info.arch}, {info.embed_dim}-d embeddings, {info.image_size}-px input"))
    d.metric("Size on disk", f"{backend.disk_bytes(cfg, name) / 2**20:.1f} MB")
    st.markdown("**Search indexes** (FAISS; recall@10 measured against exact search when built)")
    st.dataframe([{"table": t, "index type": s["factory"], "vectors": s["rows"], "nprobe": str(s.get("nprobe") or "-"),
                   "recall@10 vs exact": f"{s['recall_at_10_vs_exact']:.3f}", "built in (s)": s.get("build_seconds")}
                  for t in ("images", "captions") for s in [loaded.search.index(t).sidecar]], hide_index=True)
    recall(name, col)
    report = backend.last_index_report(cfg, name)
    if report:
        counts = report["counts"]
        skipped = backend.refused_files(report["source"]) + report["failures"]
        st.markdown(f"**Last index run** of {plain(backend.source_label(report['source']))}: {counts['indexed']} "
                    f"indexed, {counts['unchanged']} unchanged, {counts['removed']} removed, {len(skipped)} skipped, "
                    f"{counts['ignored_non_images']} non-image files ignored, in {report['seconds']['total']:.1f} s")
        if skipped:
            st.markdown("**Skipped files**")
            st.dataframe(skipped, hide_index=True)
        else:
            st.caption("No file was skipped.")


def recall(name: str, col) -> None:
    """Retrieval recall of the stored vectors against the captions of the manifest(s) they came from."""
    sources = backend.manifest_sources(col)
    if not sources:
        st.caption("Recall needs captions: this collection was indexed from folders, not from a manifest.")
        return
    for manifest, split in sources:
        key = f"recall_{name}_{manifest}_{split}"
        label = plain(manifest) + (f" (split {plain(split)})" if split else "")
        if not st.session_state.get(key) and not st.button(f"Measure recall against {label}", key=key + "_go"):
            continue
        st.session_state[key] = True
        try:
            r = backend.measured_recall(str(col.database.path), name, col.versions()["images"], manifest, split)
        except ClipdexError as e:
            st.error(f"Cannot measure recall: {plain(e)}")
            continue
        st.markdown(f"**Measured recall** on {r['gallery']} images of {label}")
        st.dataframe([{"direction": d, **{m: f"{v:.3f}" for m, v in r[key_].items()}}
                      for d, key_ in (("text → image", "t2i"), ("image → text", "i2t"))], hide_index=True)


if name in names:
    details(name)

st.subheader("Index a folder")
if cfg.index_roots:
    st.caption(f"Folders under: {', '.join(plain(r) for r in cfg.index_roots)} (set with `clipdex app --index-root`)")
else:
    st.info("This app may index no folder: restart it with `clipdex app --index-root DIR` (repeatable) to index "
            "folders under DIR from here.")
with st.form("index_form"):
    folder = st.text_input("Folder of images (absolute path)", key="index_folder")
    target = st.text_input("Into collection (new or existing)", value=name or cfg.collection, key="index_target")
    start = st.form_submit_button("Index", type="primary")
if start:
    try:
        path = check_index_folder(folder, roots=cfg.index_roots, db=cfg.db)
        target = check_collection_name(target)
        model = db.open(target).encoder_info().spec if target in names else DEFAULT_MODEL
        backend.index_jobs().start(IndexSettings(source=str(path), db=cfg.db, collection=target, model=model,
                                                 batch_size=UI_BATCH, device=cfg.device, max_pixels=cfg.max_pixels),
                                   roots=cfg.index_roots, encoder=backend.encoder(model, cfg.device))
    except ClipdexError as e:
        st.error(f"Cannot index: {plain(e)}")


def progress() -> None:
    """The latest index run of this database: a live bar while it runs, then its result."""
    job = backend.index_jobs().latest(cfg.db)
    if job is None:
        return
    where = f"{plain(job.folder)} into “{plain(job.settings.collection)}”"
    if job.running:
        done = job.done()
        st.progress(min(done / max(job.total, 1), 1.0),
                    text=f"Indexing {where}: {done:,} of {job.total:,} files done ({job.seconds():.0f} s)")
    elif job.error:
        st.error(f"Indexing {where} failed after {job.seconds():.0f} s: {plain(job.error)}")
    else:
        c = job.summary["counts"]
        st.success(f"Indexed {where} in {job.seconds():.1f} s: {c['indexed']} new, {c['unchanged']} unchanged, "
                   f"{c['failed'] + len(job.refused)} skipped; the collection holds {c['images_in_collection']:,} "
                   "images.")
    if not job.running and st.session_state.get("index_shown_running") == job.started:
        st.session_state.index_shown_running = None
        if not job.error:
            st.session_state.select_collection = job.settings.collection
        st.rerun()  # the run just ended: redraw the whole page (collections, counts, report)
    if job.running:
        st.session_state.index_shown_running = job.started


running = (job := backend.index_jobs().latest(cfg.db)) is not None and job.running
st.fragment(progress, run_every=1.0 if running else None)()
