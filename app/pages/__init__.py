"""The app's pages: Streamlit runs each file as a script (see ``clipdex/app/main.py``)."""
