"""Models and the read path, one subpackage per concept.

``models`` (registry, spec, dual encoder, checkpoints, device, image decoding, the embedded weights),
``store`` (the LanceDB record, the FAISS accelerator, search), ``answer`` (grounded answering: the
fused decoder, its prompt, generation and backends), ``training`` (both trainers and their data) and
``evaluation`` (retrieval recall and foils, collection recall, answer evaluation).
"""
