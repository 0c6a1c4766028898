"""The torch-free CLIP tokenizer gives open_clip's token ids exactly (a cold search tokenizes with it)."""

from __future__ import annotations

import numpy as np
import pytest

AWKWARD = ["", "   ", "a photo", "A RED Circle, left of a  blue\tstar!", "it's the dog's ball, isn't it?",
           "café naïve Ångström — “quotes” … 東京タワー 🐶🐱", "&amp;lt;b&amp;gt;bold&lt;/b&gt; &quot;x&quot;",
           "mojibake: cafÃ©", "numbers 3.14159 and 1,000,000 and 42nd", "<start_of_text> inside text",
           "x" * 500, " ".join(["word"] * 100), "hyphen-ated under_score slash/es back\\slash"]


@pytest.fixture(scope="module")
def tokenizers():
    import open_clip

    from clipdex.retrieval.models.bpe import ClipBpeTokenizer
    from clipdex.retrieval.models.onnx_runtime import open_clip_merges_file

    return open_clip.get_tokenizer("ViT-B-32"), ClipBpeTokenizer(open_clip_merges_file())


def _world_captions(n: int) -> list[str]:
    from clipdex.data_manifests.world.captions import make_captions
    from clipdex.data_manifests.world.generate import WorldConfig, plan_items

    items = plan_items(WorldConfig(seed=7, train=n, test=0, corpus=20, landmarks=4, views_per_landmark=1))
    rng = np.random.default_rng(0)
    out = []
    for item in items["train"] + items["corpus"]:
        for c in make_captions(item.scene, rng, n=3, with_landmark=item.kind == "landmark"):
            out += [c.text, *(text for _, text, _ in c.foils)]
    return out


def test_same_ids_as_open_clip_on_world_captions_and_awkward_text(tokenizers):
    theirs, ours = tokenizers
    texts = _world_captions(300) + AWKWARD
    assert len(texts) > 900
    np.testing.assert_array_equal(ours(texts), theirs(texts).numpy())
    for t in texts:
        assert ours.token_count(t) == len(theirs.encode(t)) + 2
    long = ours("x " * 200)
    assert long.shape == (1, 77) and long[0, -1] == ours.eot  # cut to the context, the end marker kept
