"""What the app serves and how much it accepts: one dataclass, passed from ``clipdex app`` as environment
variables (so ``streamlit run`` and Streamlit's test harness start the app the same way)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from clipdex.retrieval.store.record import DEFAULT_COLLECTION, DEFAULT_DB

ENV_PREFIX = "CLIPDEX_APP_"


@dataclass(frozen=True)
class AppSettings:
    """The app's settings.

    db: the database folder; the only folder the app writes to (indexing from the Collection page).
    collection: the collection selected when a page opens.
    index_roots: folders under which the Collection page may index a folder (none: it indexes nothing); the
        app opens files only under these and the folders its collections were indexed from.
    max_upload_mb: largest accepted upload (Streamlit refuses bigger ones before they reach the app).
    max_pixels: larger images (uploads, collection files, folders indexed from the app) are refused as
        decompression bombs (None: the one limit of the indexer and the decoder,
        ``retrieval.models.images.DEFAULT_MAX_PIXELS``; :meth:`from_env` always gives a number).
    device: where the encoder runs (auto, cpu, cuda).
    decoder: the built-in answering decoder's checkpoint (empty: the shipped one).
    password: what a session must give before any page renders (empty: no sign-in; ``clipdex app`` requires
        one to bind beyond this machine). Never shown in a repr.
    """

    db: str = DEFAULT_DB
    collection: str = DEFAULT_COLLECTION
    index_roots: tuple[str, ...] = ()
    max_upload_mb: int = 20
    max_pixels: int | None = None
    device: str = "auto"
    decoder: str = ""
    password: str = field(default="", repr=False)

    def as_env(self) -> dict[str, str]:
        """The environment variables that give these settings to the app's process."""
        return {f"{ENV_PREFIX}DB": str(Path(self.db).resolve()), f"{ENV_PREFIX}COLLECTION": self.collection,
                f"{ENV_PREFIX}INDEX_ROOTS": os.pathsep.join(str(Path(r).resolve()) for r in self.index_roots),
                f"{ENV_PREFIX}MAX_UPLOAD_MB": str(self.max_upload_mb),
                f"{ENV_PREFIX}MAX_PIXELS": str(self.max_pixels or ""),
                f"{ENV_PREFIX}DEVICE": self.device,
                f"{ENV_PREFIX}DECODER": str(Path(self.decoder).resolve()) if self.decoder else "",
                f"{ENV_PREFIX}PASSWORD": self.password}

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "AppSettings":
        """Settings from ``CLIPDEX_APP_*`` variables; unset ones keep their defaults (index roots: none)."""
        env = os.environ if env is None else env
        get = lambda key, default: env.get(ENV_PREFIX + key) or default  # noqa: E731
        roots = tuple(r for r in get("INDEX_ROOTS", "").split(os.pathsep) if r)
        return cls(db=get("DB", DEFAULT_DB), collection=get("COLLECTION", DEFAULT_COLLECTION), index_roots=roots,
                   max_upload_mb=int(get("MAX_UPLOAD_MB", cls.max_upload_mb)),
                   max_pixels=int(get("MAX_PIXELS", 0)) or _default_max_pixels(), device=get("DEVICE", cls.device),
                   decoder=get("DECODER", cls.decoder), password=get("PASSWORD", ""))


def _default_max_pixels() -> int:
    from clipdex.retrieval.models.images import DEFAULT_MAX_PIXELS  # imports torch: only in the app's process

    return DEFAULT_MAX_PIXELS
