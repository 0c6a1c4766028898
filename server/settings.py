"""What ``clipdex serve`` serves and how much it accepts: one dataclass, built by the command from its flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from clipdex.retrieval.models.registry import DEFAULT_MODEL
from clipdex.retrieval.store.record import DEFAULT_DB


@dataclass(frozen=True)
class ServeSettings:
    """The server's settings.

    db: the database folder; written to only by ``POST /index``.
    host, port: where to listen (loopback unless told otherwise; any other address needs ``token``).
    collections: the collections served (empty: every collection of the database, as it is now and later).
    token: the bearer token every request but ``/health`` and the docs must carry (empty: no auth, loopback
        only). Never shown in a repr.
    index_roots: folders under which ``POST /index`` may index (none: indexing is refused); images are served
        only from these and the folders each collection was indexed from, by the paths its rows record.
    cors_origins: browser origins allowed to call the API (none: CORS off).
    max_upload_mb, max_pixels: the largest accepted image (bytes, then pixels: decompression bombs are
        refused before decoding; None: the indexer's one limit).
    max_k: the most results one search may ask for.
    model: the model ``POST /index`` indexes a new collection with (a collection keeps the one it records).
    device: where the encoders run; runtime: what runs their towers (torch, onnx, auto); decoder: the built-in answering decoder (empty: the shipped one).
    recheck_seconds: how often a collection's table versions are compared with what is loaded (a collection
        that changed, by an index run of this server or any other process, is reopened on its next request).
    """

    db: str = DEFAULT_DB
    host: str = "127.0.0.1"
    port: int = 8600
    collections: tuple[str, ...] = ()
    token: str = field(default="", repr=False)
    index_roots: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_upload_mb: int = 20
    max_pixels: int | None = None
    max_k: int = 1000
    model: str = DEFAULT_MODEL
    device: str = "auto"
    runtime: str = "auto"
    decoder: str = ""
    recheck_seconds: float = 1.0

    @property
    def max_upload_bytes(self) -> int:
        """The largest image, in bytes."""
        return self.max_upload_mb * 2**20

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: an image at the limit sent as base64 inside JSON, with room for the rest."""
        return self.max_upload_bytes * 4 // 3 + 2**16
