"""Grounded answering: the Answerer pipeline, its backends, the fused decoder, prompt, generation and checkpoints."""
