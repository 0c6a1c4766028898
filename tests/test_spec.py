"""The model-spec parser: a table of every form, and the errors that say which form was meant."""

import pytest

from clipdex.exceptions import ModelSpecError
from clipdex.retrieval.models.spec import parse_model_spec


@pytest.mark.parametrize(
    "text, kind, arch, tag, path, hub",
    [
        ("clipdex-world", "builtin", "clipdex-s", None, "clipdex-world.safetensors", None),
        ("ViT-B-32:laion2b_s34b_b79k", "pretrained", "ViT-B-32", "laion2b_s34b_b79k", None, None),
        ("RN50:openai", "pretrained", "RN50", "openai", None, None),
        ("clipdex-s:random", "random", "clipdex-s", None, None, None),
        ("ViT-B-32:/weights/open_clip.pt", "arch_file", "ViT-B-32", None, "open_clip.pt", None),
        ("ViT-B-32:./w.safetensors", "arch_file", "ViT-B-32", None, "w.safetensors", None),
        ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "hf_hub", None, None, None, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
        ("/runs/a/model.safetensors", "checkpoint", None, None, "model.safetensors", None),
        ("runs/a/model.safetensors", "checkpoint", None, None, "model.safetensors", None),
        ("./model.pt", "checkpoint", None, None, "model.pt", None),
        ("  clipdex-world  ", "builtin", "clipdex-s", None, "clipdex-world.safetensors", None),
    ],
)
def test_spec_forms(text, kind, arch, tag, path, hub):
    spec = parse_model_spec(text)
    assert spec.kind == kind
    assert spec.arch == arch
    assert spec.tag == tag
    assert (spec.path.name if spec.path else None) == path
    assert spec.hub_id == hub


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "empty model spec"),
        ("ViT-B-32", "ViT-B-32:TAG"),  # an architecture without weights: says how to name them
        ("ViT-B/32:openai", "did you mean ViT-B-32"),
        ("not-a-model", "unknown model or architecture"),
        ("ViT-B-32:no_such_tag", "has no pretrained tag 'no_such_tag'"),
        ("hf-hub:justone", "ORG/REPO"),
        ("./notes.txt", "not a checkpoint"),
    ],
)
def test_spec_errors_name_the_form(text, says):
    with pytest.raises(ModelSpecError, match=says.replace("(", r"\(").replace(")", r"\)")):
        parse_model_spec(text)


def test_spec_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_model_spec("nope")
