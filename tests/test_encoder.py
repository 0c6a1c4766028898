"""The dual encoder: shapes, normalisation, checkpoint round-trip, and clear errors for bad checkpoints."""

import numpy as np
import pytest
import torch
from PIL import Image

from clipdex.exceptions import CheckpointError
from clipdex.retrieval.models import checkpoint as ckpt
from clipdex.retrieval.models.encoder import build_model, load_encoder
from clipdex.retrieval.models.registry import get_model_config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_encoder("clipdex-tiny:random", device="cpu")


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(n)]


def test_shapes_and_normalisation(tiny):
    img = tiny.encode_images(_images(5), batch_size=2)
    txt = tiny.encode_texts(["a red circle", "a blue star left of a green square", "x"], batch_size=2)
    assert img.shape == (5, 64) and txt.shape == (3, 64)
    assert img.dtype == np.float32 and txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    assert tiny.info.embed_dim == 64 and tiny.info.image_size == 32 and tiny.info.arch == "clipdex-tiny"


def test_batching_does_not_change_embeddings(tiny):
    texts = [f"a small shape number {i}" for i in range(7)]
    np.testing.assert_allclose(tiny.encode_texts(texts, batch_size=3), tiny.encode_texts(texts, batch_size=64), atol=1e-5)


def test_empty_inputs(tiny):
    assert tiny.encode_texts([]).shape == (0, 64)
    assert tiny.encode_images([]).shape == (0, 64)


def test_checkpoint_round_trip(tiny, tmp_path):
    path = tmp_path / "m.safetensors"
    meta = ckpt.CheckpointMeta(arch="clipdex-tiny", model_config=get_model_config("clipdex-tiny"),
                               records={"training": {"steps": 3}})
    ckpt.save_checkpoint(path, state_dict=tiny.model.state_dict(), meta=meta)
    again = load_encoder(str(path), device="cpu")
    texts = ["a red circle above a blue star"]
    np.testing.assert_allclose(again.encode_texts(texts), tiny.encode_texts(texts), atol=1e-6)
    np.testing.assert_allclose(again.encode_images(_images(2)), tiny.encode_images(_images(2)), atol=1e-5)
    assert ckpt.read_meta(path).records == {"training": {"steps": 3}}
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_compact_fp16_checkpoint_keeps_trained_rows(tiny, tmp_path):
    tokens = tiny.tokenizer(["a red circle"])[0]
    used = sorted(set(tokens.tolist()))
    path = tmp_path / "c.safetensors"
    meta = ckpt.CheckpointMeta(arch="clipdex-tiny", model_config=get_model_config("clipdex-tiny"))
    ckpt.save_checkpoint(path, state_dict=tiny.model.state_dict(), meta=meta, half=True, compact_token_ids=used)
    full = tmp_path / "f.safetensors"
    ckpt.save_checkpoint(full, state_dict=tiny.model.state_dict(), meta=meta)
    assert path.stat().st_size < full.stat().st_size / 3
    again = load_encoder(str(path), device="cpu")
    np.testing.assert_allclose(again.encode_texts(["a red circle"]), tiny.encode_texts(["a red circle"]), atol=2e-2)


def test_foreign_checkpoint_with_arch(tiny, tmp_path):
    """The ARCH:/path form loads an open_clip-style state dict (as pretrained files are)."""
    path = tmp_path / "open_clip_model.pt"
    torch.save(tiny.model.state_dict(), path)
    again = load_encoder(f"clipdex-tiny:{path}", device="cpu")
    np.testing.assert_allclose(again.encode_texts(["a star"]), tiny.encode_texts(["a star"]), atol=1e-6)


def test_missing_checkpoint_names_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nothere.safetensors"):
        build_model(str(tmp_path / "nothere.safetensors"))


def test_truncated_checkpoint_names_file(tiny, tmp_path):
    path = tmp_path / "t.safetensors"
    meta = ckpt.CheckpointMeta(arch="clipdex-tiny", model_config=get_model_config("clipdex-tiny"))
    ckpt.save_checkpoint(path, state_dict=tiny.model.state_dict(), meta=meta)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="t.safetensors"):
        build_model(str(path))


def test_corrupt_checkpoint_names_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="junk.safetensors.*(truncated|corrupt)"):
        build_model(str(path))


def test_wrong_architecture_is_refused(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit this architecture"):
        build_model(f"clipdex-s:{path}")


def test_foreign_checkpoint_without_arch_is_explained(tiny, tmp_path):
    path = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="name its architecture"):
        build_model(str(path))
