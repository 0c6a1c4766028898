"""The store: LanceDB is the record (only ``record`` calls it), FAISS the accelerator, and search over both."""
