"""The app's entry script: ``clipdex app`` runs ``streamlit run`` on this file. Page setup, the sign-in gate
(when the app has a password) and the navigation between the pages in ``views/``; each page draws the
sidebar itself (and checks the sign-in again), so it also runs alone.

The pages' folder must not be called ``pages/``: Streamlit would then serve every file in it by URL on its
own (its first multipage scheme), skipping this script and its gate whenever a session opens one first.
"""

from pathlib import Path

import streamlit as st

from clipdex.app import auth
from clipdex.app.settings import AppSettings

PAGES = Path(__file__).parent / "views"

st.set_page_config(page_title="clipdex", page_icon=":material/image_search:", layout="wide")
cfg = AppSettings.from_env()


def sign_in() -> None:
    """The sign-in page: the only page a session that has not signed in can reach."""
    auth.sign_in_form(cfg)


if auth.signed_in(cfg):
    st.navigation([
        st.Page(PAGES / "search.py", title="Search", icon=":material/search:", default=True),
        st.Page(PAGES / "ask.py", title="Ask", icon=":material/question_answer:"),
        st.Page(PAGES / "collection.py", title="Collection", icon=":material/photo_library:"),
    ]).run()
else:
    st.navigation([st.Page(sign_in, title="Sign in", icon=":material/lock:")], position="hidden").run()
