"""Device decode (``clipdex index --decode device``) run on CPU tensors: the same code a GPU runs, checked against
the CPU path (PIL decode + open_clip's transform): pixels, embeddings, EXIF orientation, fall-backs and their
reasons, and a whole index run."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from clipdex.data_manifests.world.photos import photo_like
from clipdex.exceptions import ClipdexError
from clipdex.indexer import device_decode
from clipdex.indexer.decode import DecodeItems, collate
from clipdex.indexer.device_decode import DevicePreprocess, device_decoder_for, orient, uses_device_decode
from clipdex.indexer.reader import SourceItem

MAX_PIXELS = 100_000_000


def _items(paths) -> list[SourceItem]:
    return [SourceItem(id=str(p), path=str(p)) for p in paths]


def _both_paths(encoder, paths, *, draft: bool = True) -> tuple[dict, dict, object]:
    """The CPU path's collated batch and the device path's (decoded on the CPU device), and the DeviceDecoder."""
    items = _items(paths)
    draft_size = encoder.info.image_size if draft else None
    cpu = collate([DecodeItems(items, encoder.preprocess, draft_size=draft_size)[i] for i in range(len(items))])
    decoder = device_decoder_for(encoder, decode="device", max_pixels=MAX_PIXELS)
    raw = collate([DecodeItems(items, encoder.preprocess, draft_size=draft_size, device_jpeg=True)[i]
                   for i in range(len(items))])
    return cpu, decoder.finish(raw), decoder


@pytest.fixture(scope="module")
def jpegs(tiny_world, tmp_path_factory) -> list[Path]:
    """12 world JPEGs and 7 photo-like JPEGs of odd sizes (one 640x480, as cameras make)."""
    from clipdex.data_manifests.pairs import load_pairs

    root = tmp_path_factory.mktemp("jpegs")
    world = [p for p in load_pairs(tiny_world, split="test").paths if p.suffix == ".jpg"][:12]
    out = []
    for p in world:
        out.append(root / p.name)
        shutil.copy(p, out[-1])
    for i, (w, h) in enumerate([(640, 480), (333, 517), (97, 211), (1001, 67), (64, 64), (300, 200), (225, 224)]):
        out.append(root / f"photo-{i}.jpg")
        photo_like(i, width=w, height=h).save(out[-1], quality=90)
    return out


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_is_pils_exif_transpose(orientation):
    a = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG", exif=exif.tobytes())
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    got = orient(torch.from_numpy(a).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, want)


def test_device_pixels_and_embeddings_match_the_pil_path(shipped_encoder, jpegs, monkeypatch):
    """Every JPEG goes to the device decoder; its pixels are within about one 8-bit level of PIL's full decode +
    open_clip's transform, and its embeddings at cosine >= 0.99 to the CPU path's (with PIL's draft reduction, as
    the indexer runs it; measured min 0.9993 for clipdex-world). Resized 3 at a time: the 12 world images, all of
    one size, take 4 groups."""
    monkeypatch.setattr(device_decode, "GROUP", 3)
    enc = shipped_encoder
    cpu, dev, decoder = _both_paths(enc, jpegs)
    assert decoder.fallbacks == 0 and dev["jpegs"] is None and dev["errors"] == cpu["errors"] == []
    for key in ("pos", "hash", "width", "height"):
        assert dev[key] == cpu[key], key
    _, full, _ = _both_paths(enc, jpegs, draft=False)
    pil_full = collate([DecodeItems(_items(jpegs), enc.preprocess)[i] for i in range(len(jpegs))])["pixels"]
    level = 1 / 255 / min(enc.info.std)  # one 8-bit level, normalised
    assert float((full["pixels"] - pil_full).abs().max()) <= 3 * level
    cos = (enc.encode_image_tensors(cpu["pixels"]) * enc.encode_image_tensors(dev["pixels"])).sum(-1)
    assert float(cos.min()) >= 0.99, cos


def test_vit_b32_preprocessing_matches_open_clip(jpegs):
    """ViT-B-32's 224-px transform (open_clip's preprocess config) done as tensor operations: the same pixels
    as open_clip's PIL transform of the same decoded image, to within a few 8-bit levels."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    pre = DevicePreprocess.for_model(model)
    assert pre.size == 224 and pre.resize_mode == "shortest" and pre.interpolation == "bicubic"
    images = [Image.open(p).convert("RGB") for p in jpegs[-7:]]
    want = torch.stack([preprocess(im) for im in images])
    got = pre([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images])
    level = 1 / 255 / min(pre.std)
    assert got.shape == want.shape and float((got - want).abs().max()) <= 3 * level


def test_exif_rotated_jpeg_turns_as_the_cpu_path(shipped_encoder, tmp_path):
    enc = shipped_encoder
    stored = photo_like(7, width=120, height=60)  # wide as stored; orientations 5-8 show it tall
    paths = []
    for o in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = o
        paths.append(tmp_path / f"o{o}.jpg")
        stored.save(paths[-1], exif=exif.tobytes(), quality=95)
    plain = tmp_path / "plain.jpg"
    stored.save(plain, quality=95)
    cpu, dev, decoder = _both_paths(enc, paths + [plain], draft=False)
    assert decoder.fallbacks == 0
    assert dev["width"] == cpu["width"] == [120, 60, 60, 120] and dev["height"] == cpu["height"] == [60, 120, 120, 60]
    diff = (dev["pixels"] - cpu["pixels"]).abs().amax(dim=(1, 2, 3))
    assert float(diff.max()) <= 3 / 255 / min(enc.info.std), diff
    # the test can fail: each turned image is far from the unturned one and from the opposite turn
    assert float((dev["pixels"][0] - dev["pixels"][3]).abs().max()) > 1
    assert float((dev["pixels"][1] - dev["pixels"][2]).abs().max()) > 1


def _bad_and_other_files(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    good = photo_like(3, width=90, height=70)
    files = {name: root / name for name in ("photo.png", "cmyk.jpg", "truncated.jpg", "text.jpg", "bomb.jpg",
                                             "progressive.jpg", "grey.jpg", "good.jpg")}
    good.save(files["photo.png"])
    good.convert("CMYK").save(files["cmyk.jpg"], quality=90)
    good.save(files["progressive.jpg"], progressive=True, quality=90)
    good.convert("L").save(files["grey.jpg"], quality=90)
    good.save(files["good.jpg"], quality=90)
    data = files["good.jpg"].read_bytes()
    files["truncated.jpg"].write_bytes(data[: len(data) // 2])
    files["text.jpg"].write_text("this is text, not a JPEG")
    sof = data.index(b"\xff\xc0")  # baseline frame header: length (2), precision (1), height (2), width (2)
    files["bomb.jpg"].write_bytes(data[:sof + 5] + (40000).to_bytes(2, "big") + (40000).to_bytes(2, "big")
                                  + data[sof + 9:])
    return files


def test_fallbacks_keep_the_cpu_path_and_its_reasons(shipped_encoder, tmp_path):
    enc = shipped_encoder
    files = _bad_and_other_files(tmp_path / "mixed")
    names = list(files)
    routed = collate([DecodeItems(_items(files.values()), enc.preprocess, device_jpeg=True)[i]
                      for i in range(len(files))])
    # the device gets the JPEGs it reads as PIL does; PNG and CMYK go to the CPU decoder, the bad ones fail there
    assert sorted(names[p] for p in routed["jpegs"]["pos"]) == ["good.jpg", "grey.jpg", "progressive.jpg"]
    assert sorted(names[p] for p in routed["pos"]) == ["cmyk.jpg", "photo.png"]
    cpu, dev, decoder = _both_paths(enc, files.values())
    reasons = {names[p]: r for p, r in dev["errors"]}
    assert dev["errors"] == cpu["errors"] and set(reasons) == {"truncated.jpg", "text.jpg", "bomb.jpg"}
    assert "decompression bomb" in reasons["bomb.jpg"] and "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    for key in ("pos", "hash", "width", "height"):
        assert dev[key] == cpu[key], key
    for name in ("photo.png", "cmyk.jpg"):  # decoded by the same CPU code: the same pixels exactly
        k = cpu["pos"].index(names.index(name))
        assert torch.equal(dev["pixels"][k], cpu["pixels"][k]), name
    cos = (enc.encode_image_tensors(cpu["pixels"]) * enc.encode_image_tensors(dev["pixels"])).sum(-1)
    assert float(cos.min()) >= 0.99, cos


def test_a_jpeg_the_device_refuses_is_decoded_on_the_cpu(shipped_encoder, tmp_path, monkeypatch):
    """The batch call fails, then each file alone; the one that still fails is the CPU decoder's, as the CPU path
    decodes it (the same pixels), the others stay the device's."""
    import torchvision.io

    enc = shipped_encoder
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"p{i}.jpg")
        photo_like(20 + i, width=80 + 10 * i, height=64).save(paths[-1], quality=90)
    refused = paths[1].read_bytes()
    real = torchvision.io.decode_jpeg

    def picky(data, **kw):
        many = isinstance(data, list)
        if any(bytes(t.numpy()) == refused for t in (data if many else [data])):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    cpu, dev, decoder = _both_paths(enc, paths)
    assert decoder.fallbacks == 1 and dev["errors"] == [] and dev["pos"] == cpu["pos"] == [0, 1, 2]
    assert torch.equal(dev["pixels"][1], cpu["pixels"][1])  # the fall-back: CPU decode, CPU transform
    assert not torch.equal(dev["pixels"][0], cpu["pixels"][0])  # the others: decoded by torchvision


def test_decode_choice_and_a_clear_error_without_torchvision(monkeypatch, tmp_path):
    assert uses_device_decode("auto", torch.device("cpu")) is False  # the CPU default decodes as it always did
    assert uses_device_decode("cpu", torch.device("cuda")) is False
    assert uses_device_decode("device", torch.device("cpu")) is True
    assert uses_device_decode("auto", torch.device("cuda")) is True  # torchvision's decoder is installed here
    with pytest.raises(ClipdexError, match="unknown decode"):
        uses_device_decode("gpu", torch.device("cpu"))
    monkeypatch.setattr(device_decode, "decode_jpeg_available", lambda: False)
    assert uses_device_decode("auto", torch.device("cuda")) is False
    from clipdex.indexer.runner import IndexSettings, run_index

    (tmp_path / "src").mkdir()
    photo_like(1, width=32, height=32).save(tmp_path / "src" / "a.jpg")
    with pytest.raises(ClipdexError, match="torchvision"):
        run_index(IndexSettings(source=str(tmp_path / "src"), db=str(tmp_path / "db"), decode="device"),
                  progress=False)
    assert not (tmp_path / "db").exists()  # refused before anything was made


@pytest.mark.slow
def test_index_with_decode_device_matches_the_default(tiny_world, tmp_path):
    """The same folder indexed with --decode device (on the CPU) and with the default: the same ids, hashes,
    sizes and failures, vectors at cosine >= 0.99."""
    import json

    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.indexer.runner import IndexSettings, run_index
    from clipdex.retrieval.store.record import DEFAULT_COLLECTION, Database
    from conftest import run_cli

    root = tmp_path / "photos"
    for p in load_pairs(tiny_world, split="test").paths[:14]:  # JPEGs and PNGs
        (root / "world").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / "world" / p.name)
    _bad_and_other_files(root / "mixed")
    exif = Image.Exif()
    exif[0x0112] = 6
    photo_like(9, width=96, height=48).save(root / "rotated.jpg", exif=exif.tobytes())
    default = run_index(IndexSettings(source=str(root), db=str(tmp_path / "db-cpu"), workers=1, batch_size=8,
                                      runtime="torch"), progress=False)
    device = json.loads(run_cli("index", str(root), "--db", str(tmp_path / "db-dev"), "--workers", "1",
                                "--batch-size", "8", "--runtime", "torch", "--decode", "device", "--json").stdout)
    assert default["engine"]["decode"] == "cpu" and device["engine"]["decode"] == "device (cpu)"
    assert device["engine"]["device_decode_fallbacks"] == 0 and device["seconds"]["device_decode"] > 0
    assert default["counts"]["indexed"] == device["counts"]["indexed"] == 20
    assert sorted((f["path"], f["reason"]) for f in default["failures"]) == \
        sorted((f["path"], f["reason"]) for f in device["failures"])
    rows = {}
    for name in ("db-cpu", "db-dev"):
        col = Database(tmp_path / name).open(DEFAULT_COLLECTION)
        t = col.rows(columns=["id", "content_hash", "width", "height"]).sort_by("id").to_pylist()
        vec, ids = col.vectors("images", ["id"])
        order = np.argsort(ids["id"].to_pylist())
        rows[name] = (t, vec[order])
    assert rows["db-cpu"][0] == rows["db-dev"][0]
    cos = (rows["db-cpu"][1] * rows["db-dev"][1]).sum(-1)
    assert float(cos.min()) >= 0.99, cos
