"""What a store records about the encoder that filled it (no PyTorch needed to read or compare it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EncoderInfo:
    """What a store records about the encoder that filled it, so a mismatched query can be refused."""

    spec: str
    arch: str
    embed_dim: int
    image_size: int
    context_length: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: str = ""  # fingerprint of the weights (see encoder.weights_fingerprint); "" in stores made before it

    def as_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


__all__ = ["EncoderInfo"]
