"""One image decoder: a query image is decoded exactly as the same file is when it is indexed; every still format
people have is read, by extension or by content; deep greyscale and transparency come out as a person sees them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, features

from clipdex.app.inputs import decode_checked
from clipdex.exceptions import ClipdexError
from clipdex.indexer.decode import DecodeItems
from clipdex.indexer.reader import SourceItem, read_folder
from clipdex.retrieval.models.images import BACKGROUND, open_rgb, sniff_image
from conftest import run_cli


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
    _quadrants().save(folder / "photo.avif", quality=90)
    _heic(_quadrants(), folder / "photo.heic")
    _transparent().save(folder / "alpha.png")
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
    pcx = tmp_path / "photo.pcx"
    Image.new("RGB", (8, 8), "red").save(pcx)  # PIL reads PCX, but the indexer does not index it
    with pytest.raises(ClipdexError, match=r"photo\.pcx: not a JPEG, MPO, PNG"):
        open_rgb(pcx)
    with pytest.raises(ClipdexError, match="decompression bomb"):
        open_rgb(_big(tmp_path), max_pixels=100)


def _big(folder):
    path = folder / "big.png"
    Image.new("RGB", (20, 20)).save(path)
    return path


# ---- formats -------------------------------------------------------------------------------------------------

def _quadrants(colours=((200, 30, 30), (30, 160, 60), (40, 60, 200), (230, 210, 40))) -> Image.Image:
    """32x32 RGB in four flat colours: lossy codecs keep it close, and a wrong frame or channel order shows."""
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    for k, c in enumerate(colours):
        a[16 * (k // 2):16 * (k // 2 + 1), 16 * (k % 2):16 * (k % 2 + 1)] = c
    return Image.fromarray(a)


def _heic(im: Image.Image, path) -> None:
    import pillow_heif

    pillow_heif.from_pillow(im).save(path, quality=95)  # written without registering pillow-heif's opener


def _mpo(im: Image.Image, path) -> None:
    second = _quadrants(((0, 0, 0), (255, 255, 255), (0, 0, 0), (255, 255, 255)))
    im.save(path, format="MPO", save_all=True, append_images=[second], quality=95)  # a stereo pair: left first


# name -> (write the picture there, what it should decode to, largest mean abs difference allowed)
FORMATS = {
    "photo.heic": (_heic, None, 8),
    "photo.heif": (_heic, None, 8),
    "photo.avif": (lambda im, p: im.save(p, quality=95), None, 8),
    "stereo.mpo": (_mpo, None, 4),
    "icon.ico": (lambda im, p: im.save(p, sizes=[(32, 32)]), None, 0),
    "colour.ppm": (lambda im, p: im.save(p), None, 0),
    "grey.pgm": (lambda im, p: im.convert("L").save(p), lambda im: im.convert("L").convert("RGB"), 0),
    "bitmap.pbm": (lambda im, p: im.convert("1").save(p), lambda im: im.convert("1").convert("RGB"), 0),
    "targa.tga": (lambda im, p: im.save(p), None, 0),
    "photo.jp2": (lambda im, p: im.save(p), None, 0),
}
if not features.check("avif"):
    del FORMATS["photo.avif"]  # a Pillow built without libavif
if not features.check("jpg_2000"):
    del FORMATS["photo.jp2"]  # a Pillow built without OpenJPEG


def _write_formats(folder) -> dict:
    """Every format of ``FORMATS`` in ``folder``; returns name -> (expected RGB array, tolerance)."""
    folder.mkdir(exist_ok=True)
    src, out = _quadrants(), {}
    for name, (write, expect, tol) in FORMATS.items():
        write(src, folder / name)
        out[name] = (np.asarray((expect or (lambda im: im))(src)), tol)
    return out


def test_every_still_format_is_listed_and_decoded(tmp_path):
    """HEIC/HEIF (pillow-heif), AVIF, MPO (its first picture), ICO, PPM/PGM/PBM, TGA and JPEG 2000."""
    expected = _write_formats(tmp_path)
    listing = read_folder(tmp_path)
    assert sorted(it.path.rsplit("/", 1)[1] for it in listing.items) == sorted(expected) and not listing.ignored
    decoded = DecodeItems(listing.items, transform=np.asarray)
    for pos, item in enumerate(listing.items):
        name = item.path.rsplit("/", 1)[1]
        row = decoded[pos]
        assert row["error"] is None, (name, row["error"])
        want, tol = expected[name]
        assert row["pixels"].shape == want.shape and (row["width"], row["height"]) == (32, 32), name
        diff = np.abs(row["pixels"].astype(int) - want.astype(int)).mean()
        assert diff <= tol, (name, diff)  # the right picture (for MPO the first of the pair), its colours kept


def test_an_image_under_a_wrong_or_no_extension_is_found_by_its_content(tmp_path):
    png = tmp_path / "scan.dat"
    _quadrants().save(png, format="PNG")
    _quadrants().save(tmp_path / "IMG_0001", format="JPEG")
    (tmp_path / "notes.txt").write_text("P6 is not a header here\n")
    (tmp_path / "README").write_text("holiday photos")
    (tmp_path / "empty.bin").write_bytes(b"")
    listing = read_folder(tmp_path)
    assert sorted(it.path.rsplit("/", 1)[1] for it in listing.items) == ["IMG_0001", "scan.dat"]
    assert sorted(p.rsplit("/", 1)[1] for p, _ in listing.ignored) == ["README", "empty.bin", "notes.txt"]
    assert all("not an image type" in why for _, why in listing.ignored), listing.ignored
    assert listing.ignored_by_extension() == {"(none)": 1, ".bin": 1, ".txt": 1}
    assert np.array_equal(np.asarray(open_rgb(png)), np.asarray(_quadrants()))


@pytest.mark.parametrize("head, want", [
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "PNG"),
    (b"\xff\xd8\xff\xe0\0\x10JFIF", "JPEG"),
    (b"GIF89a\x20\0", "GIF"),
    (b"RIFF\x10\0\0\0WEBPVP8 ", "WEBP"),
    (b"BM\x36\0\0\0\0\0\0\0\x36\0\0\0\x28\0\0\0", "BMP"),
    (b"II*\0\x08\0\0\0", "TIFF"),
    (b"\0\0\0\x1cftypheic\0\0\0\0mif1heic", "HEIF"),
    (b"\0\0\0\x20ftypavif\0\0\0\0avifmif1", "AVIF"),
    (b"\0\0\0\x0cjP  \r\n\x87\n\0\0\0\x14ftypjp2 ", "JPEG2000"),
    (b"\0\0\1\0\1\0\x20\x20\0\0\1\0\x20\0", "ICO"),
    (b"P6\n# made by hand\n32 24\n255\n", "PPM"),
    (b"", None),
    (b"holiday photos", None),
    (b"BMW 320d, service book\n", None),  # 'BM' alone is no bitmap
    (b"P6 is not a header here\n", None),
    (b"\0\0\0\x18ftypmp42\0\0\0\0isommp42", None),  # a video: the same box, not an image brand
    (b"\0\0\1\0\0\0", None),  # an icon directory of no icons
])
def test_sniff_image_knows_magic_numbers_and_not_lookalikes(head, want):
    assert sniff_image(head) == want


def test_index_a_folder_of_every_format_through_the_cli(tmp_path):
    """End to end: every format indexed, images under odd names found by content, other files counted by
    extension on the console and listed with their reason in the run's report."""
    root = tmp_path / "phone"
    expected = _write_formats(root)
    _quadrants().save(root / "upload.dat", format="PNG")
    (root / "notes.txt").write_text("not an image")
    (root / "sidecar.xmp").write_text("<x:xmpmeta/>")
    db = tmp_path / "db"
    out = run_cli("index", str(root), "--db", str(db), "--workers", "0", "--no-faiss", "--no-progress").stdout
    assert "2 non-image files ignored (.txt: 1, .xmp: 1)" in out, out
    report = json.loads((db / "_reports" / "default-last-index.json").read_text())
    c = report["counts"]
    assert c["indexed"] == len(expected) + 1 and report["failures"] == [], report["failures"]
    assert c["ignored_non_images"] == 2 and c["ignored_by_extension"] == {".txt": 1, ".xmp": 1}
    ignored = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in report["ignored"]}
    assert set(ignored) == {"notes.txt", "sidecar.xmp"} and "not an image type" in ignored["notes.txt"]


# ---- pixels: deep greyscale, transparency --------------------------------------------------------------------

def _stretched(path) -> np.ndarray:
    a = np.asarray(open_rgb(path))
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()  # grey stays grey
    return a[..., 0]


@pytest.mark.parametrize("name, values", [
    ("scan16.tiff", np.linspace(291, 694, 24 * 32).astype(np.uint16)),  # 16-bit: /257 would give 1..2
    ("scan16.png", np.linspace(291, 694, 24 * 32).astype(np.uint16)),
    ("phase.tiff", np.linspace(-np.pi, np.pi, 24 * 32).astype(np.float32)),  # float: clipping gives 0..3
    ("counts32.tiff", np.linspace(100_000, 200_000, 24 * 32).astype(np.int32)),  # 32-bit int: /max gives 127..255
])
def test_greyscale_deeper_than_8_bits_is_stretched_over_its_own_range(tmp_path, name, values):
    Image.fromarray(values.reshape(24, 32)).save(tmp_path / name)
    grey = _stretched(tmp_path / name)
    assert grey.min() == 0 and grey.max() == 255 and len(np.unique(grey)) > 200
    assert (np.diff(grey.ravel().astype(int)) >= 0).all()  # the order of the values is kept


def test_a_constant_deep_greyscale_image_is_mid_grey(tmp_path):
    Image.fromarray(np.full((8, 8), 700, dtype=np.uint16)).save(tmp_path / "flat16.png")
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)).save(tmp_path / "nan.tiff")
    assert (_stretched(tmp_path / "flat16.png") == 128).all() and (_stretched(tmp_path / "nan.tiff") == 128).all()


def _transparent() -> Image.Image:
    """RGBA: left half fully transparent (hiding black), right half opaque blue, bottom-right half-transparent
    white."""
    a = np.zeros((16, 16, 4), dtype=np.uint8)
    a[:, 8:] = (0, 0, 255, 255)
    a[8:, 8:] = (255, 255, 255, 128)
    return Image.fromarray(a)


def _palette_with_transparency(path) -> None:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (8, 0, 16, 16))
    im.save(path, transparency=0)


@pytest.mark.parametrize("name, write", [
    ("rgba.png", lambda p: _transparent().save(p)),
    ("rgba.webp", lambda p: _transparent().save(p, lossless=True)),
    ("la.png", lambda p: _transparent().convert("LA").save(p)),
    ("palette.gif", _palette_with_transparency),
    ("palette.png", _palette_with_transparency),
])
def test_transparent_pixels_come_out_mid_grey_not_black(tmp_path, name, write):
    write(tmp_path / name)
    a = np.asarray(open_rgb(tmp_path / name)).astype(int)
    assert (a[:, :8] == BACKGROUND).all(), a[:, :8].reshape(-1, 3)[:3]  # transparent: the neutral background
    assert (a[:8, 8:] != BACKGROUND).any(axis=-1).all()  # opaque pixels keep their colour
    if name.startswith("rgba"):
        assert (a[:8, 8:] == (0, 0, 255)).all() and (np.abs(a[8:, 8:] - 192) <= 1).all()  # half white over grey


def test_a_run_that_does_not_follow_links_refuses_a_file_swapped_for_one(tmp_path):
    """The app's runs (``follow_links=False``): a file that became a link after its listing was checked is
    refused when opened (O_NOFOLLOW), never read; a run that follows links decodes it."""
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(outside)
    link = tmp_path / "root" / "x.png"
    link.parent.mkdir()
    link.symlink_to(outside)
    item = [SourceItem(id=str(link), path=str(link))]
    refused = DecodeItems(item, transform=np.asarray, follow_links=False)[0]
    assert refused["pixels"] is None and refused["hash"] == "" and "symbolic link" in refused["error"]
    assert DecodeItems(item, transform=np.asarray)[0]["error"] is None
