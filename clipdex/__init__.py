"""clipdex: a cross-modal retrieval engine.

The repository's folders are installed under this namespace: ``clipdex.retrieval`` (models and the read
path), ``clipdex.indexer`` (the write path), ``clipdex.app`` (the Streamlit UI) and
``clipdex.data_manifests`` (dataset schemas and the built-in world).
"""

__version__ = "0.1.0"
