"""Models: the registry of configs, the model-spec parser, the dual encoder, checkpoints, the device, image decoding."""
