"""The registry of architectures as data: a user's JSON config is buildable like clipdex's own."""

from __future__ import annotations

import json

import pytest

from clipdex.exceptions import ModelSpecError
from clipdex.retrieval.models.encoder import load_encoder
from clipdex.retrieval.models.registry import CONFIG_DIR, add_model_config, get_model_config, list_models


def test_add_model_config_makes_a_new_architecture_buildable(tmp_path):
    config = json.loads((CONFIG_DIR / "clipdex-tiny.json").read_text())
    config["embed_dim"] = 48  # differs from every shipped config, so the build below is of this file
    (tmp_path / "my-arch.json").write_text(json.dumps(config))
    with pytest.raises(ModelSpecError):
        load_encoder("my-arch:random", device="cpu")
    add_model_config(tmp_path)  # a folder of configs; a single file works too
    assert "my-arch" in list_models() and get_model_config("my-arch")["embed_dim"] == 48
    enc = load_encoder("my-arch:random", device="cpu")
    vectors = enc.encode_texts(["a red circle"])
    assert vectors.shape == (1, 48)
