"""The built-in captioned world: a seeded generator of captioned shape photos standing in for a dataset.

Public API (imported lazily, so ``clipdex --help`` stays fast):

- :class:`WorldConfig`, :func:`generate_world` (``.generate``): write images and ``manifest.parquet``.
- :func:`satisfies`, :func:`score` (``.claims``): check a caption's claims against a scene or manifest row.
- :func:`oracle_recall` (``.oracle``): the recall ceiling the captions allow.

See ``data_manifests/WORLD.md`` for the world, the captions, the claims and the manifest schema.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "WorldConfig": "generate",
    "generate_world": "generate",
    "satisfies": "claims",
    "score": "claims",
    "oracle_recall": "oracle",
    "Scene": "scene",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
