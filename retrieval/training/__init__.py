"""Training: contrastive training of the dual encoder and training of the fused decoder, with their data."""
