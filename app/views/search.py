"""Search: text -> image, image -> image and image -> text, with k, a minimum score and path/size filters.
Each image result has "More like this", which searches image -> image with it."""

import streamlit as st

from clipdex.app import backend, widgets
from clipdex.app.settings import AppSettings
from clipdex.exceptions import ClipdexError

TEXT_TO_IMAGE, IMAGE_TO_IMAGE, IMAGE_TO_TEXT = "text → image", "image → image", "image → text"

cfg = AppSettings.from_env()
widgets.sidebar(cfg)
loaded = widgets.current(cfg)


def more_like_this(image_id: str) -> None:
    """Search image -> image with a result (runs before the page's next run draws its widgets)."""
    st.session_state.direction = IMAGE_TO_IMAGE
    st.session_state.search_source = "Pick from the collection"
    st.session_state.search_pick_id = image_id


st.title("Search")
direction = st.radio("Direction", [TEXT_TO_IMAGE, IMAGE_TO_IMAGE, IMAGE_TO_TEXT], horizontal=True, key="direction")
query, image = "", None
if direction == TEXT_TO_IMAGE:
    query = st.text_input("Describe the images you want", key="search_text",
                          placeholder="a red circle left of a blue star").strip()
else:
    image, _ = widgets.image_query(loaded, cfg, key="search")

left, right = st.columns(2)
k = left.slider("Results (k)", 1, 48, 12, key="search_k")
min_score = right.slider("Minimum score (cosine similarity; -1 keeps everything)", -1.0, 1.0, -1.0, 0.05,
                         key="search_min_score")
with st.expander("Filters: path and image size"):
    path_col, w_col, h_col = st.columns([2, 1, 1])
    path_glob = path_col.text_input("Path glob (a relative glob matches at any depth: album-003/*, *.png)",
                                    key="search_path").strip() or None
    min_width = w_col.number_input("Minimum width (px)", 0, 1_000_000, 0, key="search_min_width")
    min_height = h_col.number_input("Minimum height (px)", 0, 1_000_000, 0, key="search_min_height")
where = " AND ".join(f"{c} >= {int(v)}" for c, v in (("width", min_width), ("height", min_height)) if v) or None
opts = {"k": k, "min_score": min_score if min_score > -1.0 else None, "where": where, "path_glob": path_glob}

if direction == TEXT_TO_IMAGE and not query:
    st.info("Type a description to find the images of the collection that match it.")
    st.stop()
if direction != TEXT_TO_IMAGE and image is None:
    st.info("Upload an image or pick one from the collection to search with it.")
    st.stop()
try:
    if direction == TEXT_TO_IMAGE:
        hits, seconds = backend.timed(loaded.search.search_text, query, **opts)
    elif direction == IMAGE_TO_IMAGE:
        hits, seconds = backend.timed(loaded.search.search_image, image, **opts)
    else:
        hits, seconds = backend.timed(loaded.search.search_captions, image, **opts)
except ClipdexError as e:
    st.error(f"Search failed: {widgets.plain(e)}")
    st.stop()

st.caption(f"{len(hits)} results in {seconds * 1000:.0f} ms")
if not hits:
    st.warning("No results: loosen the filters or lower the minimum score.")
elif direction == IMAGE_TO_TEXT:
    widgets.caption_table(hits)
else:
    widgets.hit_grid(loaded, hits, cfg, more_like_this=more_like_this)
