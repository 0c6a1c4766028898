"""The built-in captioned world: a seeded generator of captioned shape photos standing in for a dataset.

- ``generate``: :class:`WorldConfig` and :func:`generate_world` write images and ``manifest.parquet``.
- ``claims``: :func:`satisfies` and :func:`score` check a caption's claims against a scene or manifest row.
- ``oracle``: :func:`oracle_recall`, the recall ceiling the captions allow.
- ``scene``, ``render``, ``captions``, ``landmarks``, ``questions``, ``vocab``: the pieces those use.

See ``data_manifests/WORLD.md`` for the world, the captions, the claims and the manifest schema.
"""
