"""One image decoder: a query image is decoded exactly as the same file is when it is indexed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipdex.app.inputs import decode_checked
from clipdex.exceptions import ClipdexError
from clipdex.indexer.decode import DecodeItems
from clipdex.indexer.reader import SourceItem
from clipdex.retrieval.models.images import open_rgb


def _files(folder):
    rng = np.random.default_rng(0)
    grey16 = (np.linspace(0, 65535, 32 * 24).reshape(24, 32)).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")  # mode I;16: PIL's convert alone would clip it white
    rgb = Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate a quarter turn on display
    rgb.save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png")
    Image.fromarray((np.linspace(0, 1, 16 * 16).reshape(16, 16)).astype(np.float32)).save(folder / "float.tiff")
    return sorted(folder.iterdir())


def test_query_path_and_indexing_path_decode_the_same_pixels(tmp_path):
    files = _files(tmp_path)
    indexed = DecodeItems([SourceItem(id=str(f), path=str(f)) for f in files], transform=np.asarray)
    for pos, f in enumerate(files):
        row = indexed[pos]
        assert row["error"] is None, (f.name, row["error"])
        query = np.asarray(open_rgb(f))
        assert query.shape == row["pixels"].shape and np.array_equal(query, row["pixels"]), f.name
        upload = np.asarray(decode_checked(f.read_bytes(), label=f.name, max_pixels=10**6))  # the app's check
        assert np.array_equal(upload, row["pixels"]), f.name
    grey = np.asarray(open_rgb(tmp_path / "grey16.png"))
    assert grey.min() == 0 and grey.max() == 255 and len(np.unique(grey)) > 100  # scaled, not clipped
    assert np.asarray(open_rgb(tmp_path / "rotated.jpg")).shape == (40, 20, 3)  # EXIF orientation applied


def test_a_query_in_a_format_indexing_refuses_is_refused_naming_the_file(tmp_path):
    ppm = tmp_path / "photo.ppm"
    Image.new("RGB", (8, 8), "red").save(ppm)  # PIL reads PPM, but the indexer does not index it
    with pytest.raises(ClipdexError, match=r"photo\.ppm: not a JPEG, PNG"):
        open_rgb(ppm)
    with pytest.raises(ClipdexError, match="decompression bomb"):
        open_rgb(_big(tmp_path), max_pixels=100)


def _big(folder):
    path = folder / "big.png"
    Image.new("RGB", (20, 20)).save(path)
    return path
