"""The app's pages: Streamlit runs each file as a script, through ``clipdex/app/main.py``'s navigation (the
folder is not named ``pages/``, which Streamlit would serve by URL on its own, past main.py)."""
