"""The pieces the pages share: the collection picker in the sidebar, the image-query input (upload or pick
from the collection), the grid of image results and the table of caption results.

Anything that comes from a file, a caption or an upload is shown as plain text: alone with ``st.text``,
inside a sentence (Markdown: ``st.caption``, ``st.error``, labels, tooltips) escaped with :func:`plain`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fnmatch import fnmatch

import streamlit as st
from PIL import Image

from clipdex.app import auth, backend
from clipdex.app.inputs import UPLOAD_TYPES, InputError, check_upload
from clipdex.app.settings import AppSettings
from clipdex.exceptions import ClipdexError
from clipdex.retrieval.answer.backend import Evidence
from clipdex.retrieval.store.search import Hit

PICK_LIMIT = 500  # collection images offered in the picker at once (narrow them with the path filter)
GRID_COLUMNS = 4
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:&@])")


def plain(text: str) -> str:
    """``text`` from the collection or the user (a caption, a path, a question) escaped, so that Streamlit
    shows it as written instead of reading it as Markdown, colour directives, emoji codes or LaTeX."""
    return _MARKDOWN.sub(r"\\\1", str(text))


def sidebar(cfg: AppSettings) -> None:
    """The database and the collection every page works on. Stops the page if the session has not signed in
    (``main.py`` shows the sign-in form instead of any page).

    The choice is kept in ``st.session_state.collection``, apart from the picker's own state: Streamlit
    makes each page's picker a widget of its own and drops a widget's state when another page runs."""
    if not auth.signed_in(cfg):
        st.stop()
    st.sidebar.caption(f"Database: {plain(cfg.db)}")
    db = backend.database(cfg)
    names = db.collections() if db else []
    if not names:
        st.sidebar.info("No collection yet: index a folder on the Collection page.")
        st.session_state.pop("collection", None)
        return
    if st.session_state.get("select_collection") in names:  # set by a page before the picker exists
        st.session_state.collection = st.session_state.pop("select_collection")
    if st.session_state.get("collection") not in names:
        st.session_state.collection = cfg.collection if cfg.collection in names else names[0]
    st.session_state.collection_picker = st.session_state.collection
    st.sidebar.selectbox("Collection", names, key="collection_picker", on_change=_picked)


def _picked() -> None:
    st.session_state.collection = st.session_state.collection_picker


def current(cfg: AppSettings) -> backend.LoadedCollection:
    """The selected collection, loaded; stops the page with a message when there is none or it fails."""
    name = st.session_state.get("collection")
    if not name:
        st.info(f"There is no collection in {plain(cfg.db)} yet. Index a folder on the Collection page, or run "
                "`clipdex index FOLDER --db DB` and reload.")
        st.stop()
    try:
        return backend.load(cfg, name)
    except ClipdexError as e:
        st.error(f"Cannot open collection {plain(repr(name))}: {plain(e)}")
        st.stop()


def image_query(loaded: backend.LoadedCollection, cfg: AppSettings, *, key: str) -> tuple[Image.Image | None, str]:
    """An image to query with: an upload (checked) or an image of the collection (by id). Returns the image
    (None until there is one) and a label for it."""
    source = st.radio("Image", ["Upload an image", "Pick from the collection"], horizontal=True,
                      key=f"{key}_source", label_visibility="collapsed")
    if source == "Upload an image":
        up = st.file_uploader(f"Upload an image ({', '.join(UPLOAD_TYPES)}; up to {cfg.max_upload_mb} MB)",
                              type=list(UPLOAD_TYPES), max_upload_size=cfg.max_upload_mb, key=f"{key}_upload")
        if up is None:
            return None, ""
        try:
            im = check_upload(up.name, up.getvalue(), max_bytes=cfg.max_upload_mb * 2**20, max_pixels=cfg.max_pixels)
        except InputError as e:
            st.error(f"Upload refused: {plain(e)}")
            return None, ""
        st.image(im, width=160)
        st.text(up.name)
        return im, up.name
    image_id = pick_image(loaded, key=f"{key}_pick")
    if image_id is None:
        return None, ""
    try:
        im = backend.collection_image(loaded, image_id, max_pixels=cfg.max_pixels)
    except InputError as e:
        st.error(plain(e))
        return None, ""
    st.image(backend.thumbnail(loaded, loaded.path_of(image_id), max_pixels=cfg.max_pixels) or im, width=160)
    st.text(image_id)
    return im, image_id


def pick_image(loaded: backend.LoadedCollection, *, key: str) -> str | None:
    """A selectbox of collection image ids (narrowed by a path glob); the choice is an id, never a path."""
    pattern = st.text_input("Filter by path (glob, e.g. *album-003*)", key=f"{key}_filter").strip()
    ids = [i for i, p in zip(loaded.ids, loaded.paths) if not pattern or fnmatch(p, pattern)][:PICK_LIMIT]
    chosen = st.session_state.get(f"{key}_id")
    if chosen in loaded.position and chosen not in ids:
        ids.insert(0, chosen)  # set by "more like this": keep it selectable whatever the filter
    if not ids:
        st.warning("No image of the collection matches that filter.")
        return None
    return st.selectbox(f"Image ({len(ids)} shown)", ids, key=f"{key}_id")


def hit_grid(loaded: backend.LoadedCollection, hits: list[Hit] | list[Evidence], cfg: AppSettings, *,
             more_like_this: Callable[[str], None] | None = None, strongest: bool = False) -> None:
    """Image results (search hits or an answer's evidence: each has rank, id, path, score) as a grid of
    thumbnails with rank, score and first caption; "More like this" calls ``more_like_this(image_id)``;
    ``strongest`` marks the best-scoring result."""
    top = max((h.score for h in hits), default=None)
    for row in range(0, len(hits), GRID_COLUMNS):
        for col, hit in zip(st.columns(GRID_COLUMNS), hits[row:row + GRID_COLUMNS]):
            with col.container(border=True):
                thumb = backend.thumbnail(loaded, hit.path, max_pixels=cfg.max_pixels)
                if thumb is None:
                    st.warning("file missing, unreadable or outside the app's folders")
                else:
                    st.image(thumb, width="stretch")
                badge = " :orange-badge[strongest]" if strongest and hit.score == top else ""
                st.markdown(f"**#{hit.rank}** · score `{hit.score:.3f}`{badge}")
                caps = loaded.captions.get(hit.id)
                st.text(caps[0] if caps else hit.path.rsplit("/", 1)[-1], help=plain(hit.path))
                if more_like_this is not None:
                    st.button("More like this", key=f"more_{hit.rank}_{hit.id}", on_click=more_like_this,
                              args=(hit.id,))


def caption_table(hits: list[Hit], *, strongest: bool = False) -> None:
    """Caption results: rank, score, caption and the image it belongs to; ``strongest`` marks the best."""
    top = max((h.score for h in hits), default=None)
    rows = [{"rank": h.rank, "score": round(h.score, 3), "caption": h.caption, "image": h.image_id}
            | ({"": "strongest" if h.score == top else ""} if strongest else {}) for h in hits]
    st.dataframe(rows, hide_index=True,
                 column_config={"score": st.column_config.ProgressColumn("score", min_value=-1.0, max_value=1.0,
                                                                         format="%.3f")})
