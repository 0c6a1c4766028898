"""One parser for every model spec a user may type, returning a small typed value.

Accepted forms (timm's ``parse_model_name`` is the model for this):

=================================  ===============================================================
``clipdex-world``                  a built-in trained model (``clipdex models`` lists them)
``ViT-B-32:laion2b_s34b_b79k``     an open_clip architecture and a pretrained tag (downloads once)
``clipdex-s:random``               an architecture with random weights (training from scratch)
``ViT-B-32:/path/to/weights.pt``   an architecture and a local checkpoint file in open_clip's format
``hf-hub:laion/CLIP-ViT-B-32...``  a Hugging Face Hub repo holding an open_clip model
``/path/to/model.safetensors``     a local checkpoint written by ``clipdex train`` (carries its config)
=================================  ===============================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from clipdex.exceptions import ModelSpecError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
SpecKind = Literal["builtin", "pretrained", "random", "arch_file", "hf_hub", "checkpoint"]

FORMS_HELP = (
    "a built-in name (clipdex-world), ARCH:TAG (ViT-B-32:laion2b_s34b_b79k), ARCH:random, "
    "ARCH:/path/to/weights.pt, hf-hub:ORG/REPO, or a path to a checkpoint written by clipdex train"
)


@dataclass(frozen=True)
class ModelSpec:
    """What a model spec string resolved to. ``text`` is the string as the user typed it."""

    kind: SpecKind
    text: str
    arch: str | None = None
    tag: str | None = None
    path: Path | None = None
    hub_id: str | None = None


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.lower().endswith(CHECKPOINT_SUFFIXES)


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``text`` into a :class:`ModelSpec`; raises :class:`ModelSpecError` saying which form was meant."""
    from clipdex.retrieval.models.registry import BUILTIN_MODELS, get_model_config

    spec = text.strip()
    if not spec:
        raise ModelSpecError(f"empty model spec; expected {FORMS_HELP}")
    if spec in BUILTIN_MODELS:
        return ModelSpec(kind="builtin", text=spec, arch=BUILTIN_MODELS[spec].arch, path=BUILTIN_MODELS[spec].checkpoint)
    if spec.startswith("hf-hub:"):
        hub_id = spec[len("hf-hub:"):]
        if hub_id.count("/") != 1 or not all(hub_id.split("/")):
            raise ModelSpecError(f"{text!r}: an hf-hub spec needs ORG/REPO after 'hf-hub:', e.g. hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
        return ModelSpec(kind="hf_hub", text=spec, hub_id=hub_id)
    if _looks_like_path(spec) and ":" not in spec.split("/")[0][1:]:
        path = Path(spec).expanduser()
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES and not path.is_dir():
            raise ModelSpecError(f"{text!r} looks like a path but not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
        return ModelSpec(kind="checkpoint", text=spec, path=path)
    arch, sep, tag = spec.partition(":")
    if get_model_config(arch) is None:
        hint = ""
        if arch.replace("/", "-") != arch and get_model_config(arch.replace("/", "-")):
            hint = f" (did you mean {arch.replace('/', '-')}?)"
        raise ModelSpecError(
            f"{text!r}: unknown model or architecture {arch!r}{hint}. Expected {FORMS_HELP}. "
            "`clipdex models` lists the names."
        )
    if not sep or not tag:
        raise ModelSpecError(
            f"{text!r} names an architecture but no weights: write {arch}:TAG for pretrained weights "
            f"(e.g. ViT-B-32:laion2b_s34b_b79k), {arch}:random for random weights, or {arch}:/path/to/weights.pt"
        )
    if tag == "random":
        return ModelSpec(kind="random", text=spec, arch=arch)
    if _looks_like_path(tag):
        return ModelSpec(kind="arch_file", text=spec, arch=arch, path=Path(tag).expanduser())
    from clipdex.retrieval.models.registry import list_pretrained

    tags = sorted(t for a, t in list_pretrained() if a == arch)
    if tag not in tags:
        known = ", ".join(tags) if tags else "none (use :random or a local file)"
        raise ModelSpecError(f"{text!r}: {arch} has no pretrained tag {tag!r}; its tags: {known}")
    return ModelSpec(kind="pretrained", text=spec, arch=arch, tag=tag)
