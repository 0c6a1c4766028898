"""Models and the read path: model registry and loading, the dual encoder, training, evaluation."""
