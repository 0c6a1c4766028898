"""Loading image files into preprocessed tensors, in DataLoader worker processes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps

from clipdex.exceptions import ClipdexError


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image file as RGB with EXIF orientation applied; errors name the file."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ClipdexError(f"{path}: cannot read image ({e})") from e


class ImageFiles(torch.utils.data.Dataset):
    """Paths -> transformed tensors (``transform`` is open_clip's preprocess)."""

    def __init__(self, paths: Sequence[Path], transform: Callable):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(open_rgb(self.paths[i]))


def default_workers() -> int:
    """Worker processes for decoding: all cores but one, at least 1 (0 would decode in the main process)."""
    import os

    return max(1, min(8, (os.cpu_count() or 2) - 1))


def iter_image_batches(paths: Sequence[Path], transform: Callable, *, batch_size: int = 256,
                       workers: int | None = None):
    """Yield preprocessed (B, 3, H, W) batches of ``paths`` in order, decoded in worker processes."""
    workers = default_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(ImageFiles(paths, transform), batch_size=batch_size,
                                         num_workers=workers, shuffle=False,
                                         persistent_workers=False, pin_memory=torch.cuda.is_available())
    yield from loader
