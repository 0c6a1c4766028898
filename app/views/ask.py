"""Ask: a question about an image (or none, for a caption), answered from the collection with its evidence.

The image retrieves the collection's top-k images with their first captions; the built-in fused decoder
answers from them (:mod:`clipdex.retrieval.answer.answerer`, the same path as ``clipdex ask``). The evidence is shown
with each item's retrieval score and its weight: the share of the answer's probability mass that came from
it. The item the answer rests on most is marked.
"""

import streamlit as st

from clipdex.app import backend, widgets
from clipdex.app.settings import AppSettings
from clipdex.exceptions import ClipdexError

cfg = AppSettings.from_env()
widgets.sidebar(cfg)
loaded = widgets.current(cfg)

st.title("Ask")
st.caption("Ask about an image: the answer comes from the images and captions retrieved from this collection, "
           "and the evidence below shows how much it drew on each.")
image, label = widgets.image_query(loaded, cfg, key="ask")
with st.form("ask_form"):
    question = st.text_input("Your question (leave it empty to ask for a caption)", key="ask_question",
                             placeholder="when was it built?").strip()
    k = st.slider("Pieces of evidence to retrieve", 1, 8, 5, key="ask_k")
    beams = st.slider("Beam width (1: greedy)", 1, 4, 1, key="ask_beams")
    asked = st.form_submit_button("Ask", type="primary")
if not asked:
    st.stop()
if image is None:
    st.error("Upload an image or pick one from the collection first.")
    st.stop()
try:
    from clipdex.retrieval.answer.answerer import Answerer

    answerer = Answerer(loaded.search, backend.decoder(cfg.decoder, cfg.device))  # refuses another encoder
    result, seconds = backend.timed(answerer.ask, image=image, question=question or None, k=k, beams=beams)
except ClipdexError as e:
    st.error(f"Answering failed: {widgets.plain(e)}")
    st.stop()

st.subheader("Answer")
asked_for = f"“{widgets.plain(question)}”" if question else "a caption"
st.success(f"**{widgets.plain(result.answer) or '(empty answer)'}**", icon=":material/chat:")
st.caption(f"You asked for {asked_for} about {widgets.plain(label)}. Answered by {widgets.plain(result.backend)} from "
           f"{len(result.evidence)} retrieved items in {seconds * 1000:.0f} ms.")
st.subheader("Evidence")
top = max((e.weight or 0.0 for e in result.evidence), default=0.0)
rows = [{"rank": e.rank, "weight": e.weight, "score": e.score, "caption": e.caption, "image": e.id,
         "": "answer rests on this" if e.weight and e.weight == top else ""} for e in result.evidence]
st.dataframe(rows, hide_index=True, column_config={
    "weight": st.column_config.ProgressColumn("weight", min_value=0.0, max_value=1.0, format="%.3f",
                                              help="share of the answer's probability mass drawn from this item"),
    "score": st.column_config.NumberColumn("score", format="%.3f", help="cosine similarity to your image")})
st.caption("Weight: how much the answer drew on the item (the decoder's copy and attention mass). "
           "Score: how similar the item is to your image (retrieval).")
widgets.hit_grid(loaded, result.evidence, cfg)
