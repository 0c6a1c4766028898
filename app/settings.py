"""What the app serves and how much it accepts: one dataclass, passed from ``clipdex app`` as environment
variables (so ``streamlit run`` and Streamlit's test harness start the app the same way)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from clipdex.retrieval.store.record import DEFAULT_COLLECTION, DEFAULT_DB

ENV_PREFIX = "CLIPDEX_APP_"


@dataclass(frozen=True)
class AppSettings:
    """The app's settings.

    db: the database folder; the only folder the app writes to (indexing from the Collection page).
    collection: the collection selected when a page opens.
    index_roots: folders under which the Collection page may index a folder; any other path is refused.
    max_upload_mb: largest accepted upload (Streamlit refuses bigger ones before they reach the app).
    max_pixels: larger images (uploads or collection files) are refused as decompression bombs.
    device: where the encoder runs (auto, cpu, cuda).
    decoder: the built-in answering decoder's checkpoint (empty: the shipped one).
    """

    db: str = DEFAULT_DB
    collection: str = DEFAULT_COLLECTION
    index_roots: tuple[str, ...] = ()
    max_upload_mb: int = 20
    max_pixels: int = 40_000_000
    device: str = "auto"
    decoder: str = ""

    def as_env(self) -> dict[str, str]:
        """The environment variables that give these settings to the app's process."""
        return {f"{ENV_PREFIX}DB": str(Path(self.db).resolve()), f"{ENV_PREFIX}COLLECTION": self.collection,
                f"{ENV_PREFIX}INDEX_ROOTS": os.pathsep.join(str(Path(r).resolve()) for r in self.index_roots),
                f"{ENV_PREFIX}MAX_UPLOAD_MB": str(self.max_upload_mb), f"{ENV_PREFIX}MAX_PIXELS": str(self.max_pixels),
                f"{ENV_PREFIX}DEVICE": self.device,
                f"{ENV_PREFIX}DECODER": str(Path(self.decoder).resolve()) if self.decoder else ""}

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "AppSettings":
        """Settings from ``CLIPDEX_APP_*`` variables; unset ones keep their defaults (index roots: home)."""
        env = os.environ if env is None else env
        get = lambda key, default: env.get(ENV_PREFIX + key) or default  # noqa: E731
        roots = tuple(r for r in get("INDEX_ROOTS", "").split(os.pathsep) if r) or (str(Path.home()),)
        return cls(db=get("DB", DEFAULT_DB), collection=get("COLLECTION", DEFAULT_COLLECTION), index_roots=roots,
                   max_upload_mb=int(get("MAX_UPLOAD_MB", cls.max_upload_mb)),
                   max_pixels=int(get("MAX_PIXELS", cls.max_pixels)), device=get("DEVICE", cls.device),
                   decoder=get("DECODER", cls.decoder))
