"""The app's entry script: ``clipdex app`` runs ``streamlit run`` on this file. Page setup and the
navigation between the pages in ``pages/``; each page draws the sidebar itself, so it also runs alone."""

from pathlib import Path

import streamlit as st

PAGES = Path(__file__).parent / "pages"

st.set_page_config(page_title="clipdex", page_icon=":material/image_search:", layout="wide")
page = st.navigation([
    st.Page(PAGES / "search.py", title="Search", icon=":material/search:", default=True),
    st.Page(PAGES / "ask.py", title="Ask", icon=":material/question_answer:"),
    st.Page(PAGES / "collection.py", title="Collection", icon=":material/photo_library:"),
])
page.run()
