"""The Streamlit front end (issue: Streamlit front end). Only calls ``clipdex.retrieval``/``indexer``."""
