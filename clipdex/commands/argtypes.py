"""argparse value types and help texts shared by every subcommand."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting whole numbers >= ``minimum``, with a message that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


SPEC_HELP = ("model spec: a built-in name (clipdex-world), ARCH:TAG (ViT-B-32:laion2b_s34b_b79k), ARCH:random, "
             "ARCH:/path/weights.pt, hf-hub:ORG/REPO, or a checkpoint path")
