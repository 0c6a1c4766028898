"""The write path: collection -> decoded batches -> embeddings -> store (issue: indexer and search)."""
