"""Ask: a question about an image (or none, for a caption), answered from the collection with its evidence.

Grounded answering arrives with the answering module (the decoder). Until then the page says so plainly and
shows what an answer will be grounded in: the collection's most similar images and the captions that best
describe the image, with their retrieval scores. It never makes up an answer.
"""

import streamlit as st

from clipdex.app import backend, widgets
from clipdex.app.settings import AppSettings
from clipdex.retrieval.exceptions import ClipdexError

NO_DECODER = ("**No decoder yet.** Grounded answering arrives with the answering module: it will answer from "
              "the evidence below and show the weight it puts on each piece. Until then this page shows the "
              "retrieved evidence only.")

cfg = AppSettings.from_env()
widgets.sidebar(cfg)
loaded = widgets.current(cfg)

st.title("Ask")
st.warning(NO_DECODER, icon=":material/construction:")
image, label = widgets.image_query(loaded, cfg, key="ask")
with st.form("ask_form"):
    question = st.text_input("Your question (leave it empty to ask for a caption)", key="ask_question",
                             placeholder="what colour is the star?").strip()
    k = st.slider("Pieces of evidence to retrieve", 1, 16, 8, key="ask_k")
    asked = st.form_submit_button("Ask", type="primary")
if not asked:
    st.stop()
if image is None:
    st.error("Upload an image or pick one from the collection first.")
    st.stop()
try:
    vector, s_embed = backend.timed(loaded.search.embed_image, image)  # embedded once for both searches
    images, s_images = backend.timed(loaded.search.search_vector, vector, table="images", k=k)
    captions, s_captions = backend.timed(loaded.search.search_vector, vector, table="captions", k=k)
except ClipdexError as e:
    st.error(f"Retrieval failed: {widgets.plain(e)}")
    st.stop()

st.subheader("Answer")
asked_for = f"the question “{widgets.plain(question)}”" if question else "a caption"
st.info(f"No answer yet: no decoder. You asked for {asked_for} about {widgets.plain(label)}; it will be answered "
        "when the answering module lands.", icon=":material/block:")
st.subheader("Retrieved evidence (no answer yet: no decoder)")
st.caption(f"Scores are retrieval scores (cosine similarity to your image), not answer weights; the strongest "
           f"is marked. Retrieved in {(s_embed + s_images + s_captions) * 1000:.0f} ms.")
st.markdown("**Similar images in the collection**")
widgets.hit_grid(loaded, images, cfg, strongest=True)
st.markdown("**Captions that describe the image best**")
widgets.caption_table(captions, strongest=True)
