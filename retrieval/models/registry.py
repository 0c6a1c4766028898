"""The registry of model architectures, as data: ``retrieval/models/model_configs/*.json`` (open_clip's
format), and :func:`add_model_config` for a user's own.

Our own configs are registered with open_clip on first use, so ``open_clip.create_model("clipdex-s")``
builds them like any built-in architecture. ``BUILTIN_MODELS`` names the trained checkpoints that ship
with clipdex (the embedded default).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(str(resources.files("clipdex.retrieval.models") / "model_configs"))
WEIGHTS_DIR = Path(str(resources.files("clipdex.retrieval.models") / "weights"))


@dataclass(frozen=True)
class BuiltinModel:
    """A trained checkpoint that ships with clipdex."""

    name: str
    arch: str
    checkpoint: Path
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "clipdex-world": BuiltinModel(
        name="clipdex-world",
        arch="clipdex-s",
        checkpoint=WEIGHTS_DIR / "clipdex-world.safetensors",
        description="the embedded default: clipdex-s trained on the built-in captioned world "
        "(knows that world's shapes, colours and landmarks, not real photos)",
    ),
    "clipdex-spatial": BuiltinModel(
        name="clipdex-spatial",
        arch="clipdex-xs",
        checkpoint=WEIGHTS_DIR / "clipdex-spatial.safetensors",
        description="clipdex-xs trained on 2 CPU cores on counterfactual world batches with a curriculum and "
        "layout supervision: reads where things are (spatial foils 0.94), retrieves a little less well than "
        "clipdex-world (TRAINING.md)",
    ),
}
DEFAULT_MODEL = "clipdex-world"

_registered = False
_FULL_CONFIGS: dict[str, dict] = {}  # configs as clipdex keeps them, clipdex_* keys included


def _register(arch: str, config: dict) -> None:
    """Keep the full config here and give open_clip the config without clipdex's own keys."""
    from open_clip import factory

    _FULL_CONFIGS[arch] = config
    factory._MODEL_CONFIGS[arch] = {k: v for k, v in config.items() if not k.startswith("clipdex_")}


def ensure_registered() -> None:
    """Register clipdex's JSON configs with open_clip (idempotent, done lazily, not at import)."""
    global _registered
    if _registered:
        return
    for path in sorted(CONFIG_DIR.glob("*.json")):
        _register(path.stem, read_config_file(path))
    _registered = True


def list_models() -> list[str]:
    """Every architecture open_clip can build, clipdex's own included."""
    ensure_registered()
    import open_clip

    return list(open_clip.list_models())


def list_pretrained() -> list[tuple[str, str]]:
    """(architecture, pretrained tag) pairs open_clip knows how to download."""
    import open_clip

    return list(open_clip.list_pretrained())


def get_model_config(arch: str) -> dict | None:
    """The config dict of a registered architecture (clipdex's keys included), or None."""
    ensure_registered()
    import open_clip

    if arch in _FULL_CONFIGS:
        return dict(_FULL_CONFIGS[arch])
    return open_clip.get_model_config(arch)


def add_model_config(path: str | Path) -> None:
    """Register more architectures: a JSON file in open_clip's format, or a folder of them."""
    ensure_registered()
    path = Path(path)
    for p in sorted(path.glob("*.json")) if path.is_dir() else [path]:
        _register(p.stem, read_config_file(p))


def register_config(arch: str, config: dict) -> str:
    """Make a config carried inside a checkpoint buildable; returns the name to build it by.

    A checkpoint whose config differs from the registry's entry of the same name (an older or edited
    architecture) is registered under ``ARCH@<hash>`` so the registry's own entry is never overwritten.
    """
    import hashlib
    import json

    known = get_model_config(arch)
    if known is None or known == config:
        _register(arch, config)
        return arch
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{arch}@{digest}"
    logger.info("checkpoint's config for %s differs from the registry's; building it as %s", arch, name)
    _register(name, config)
    return name


def read_config_file(path: Path) -> dict:
    """Read one JSON model config."""
    return json.loads(Path(path).read_text())
