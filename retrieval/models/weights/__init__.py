"""The embedded default checkpoint and its training record live in this folder."""
