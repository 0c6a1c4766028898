"""Evaluation: retrieval recall and foils, a collection's recall, grounded-answer evaluation."""
