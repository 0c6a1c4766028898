"""Device decode: the JPEGs of a batch decoded together on the encoder's device (nvJPEG on CUDA), resized, cropped
and normalised there; every other file as the CPU decoder does it.

The decode workers (:mod:`clipdex.indexer.decode`) still read each file and hash it, and check a JPEG's header
(format, colour mode, pixel limit, EXIF orientation) before they hand its bytes over, so the plan and the rows are
the CPU path's. Here, in the indexing process, :class:`DeviceDecoder` decodes those bytes with
``torchvision.io.decode_jpeg`` (a list of files at once; on CUDA, nvJPEG's batched decoder), turns each image as
its EXIF orientation says (torchvision's CUDA decoder ignores ``apply_exif_orientation``, so it is done here, the
same way on either device) and preprocesses them as the model's open_clip eval transform does
(:class:`DevicePreprocess`). A file the device decoder refuses is decoded by the CPU decoder
(:func:`~clipdex.retrieval.models.images.decode_image`) here and fails, if it does, with the CPU path's reason.
The same code runs on CPU tensors, which is how it is tested without a GPU.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipdex.exceptions import ClipdexError
from clipdex.indexer.decode import failure_reason
from clipdex.retrieval.models.images import decode_image

logger = logging.getLogger(__name__)

DECODES = ("auto", "cpu", "device")


def decode_jpeg_available() -> bool:
    """Whether torchvision's ``decode_jpeg`` (with its compiled image ops) can be used in this environment."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
        from torchvision.io.image import _assert_has_image_ops

        _assert_has_image_ops()
    except (ImportError, RuntimeError, AttributeError):
        return False
    return True


def check_decode(decode: str) -> None:
    """Refuse an unknown ``--decode`` choice, and ``device`` where torchvision's JPEG decoder is missing."""
    if decode not in DECODES:
        raise ClipdexError(f"unknown decode {decode!r}: use one of {', '.join(DECODES)}")
    if decode == "device" and not decode_jpeg_available():
        raise ClipdexError("--decode device needs torchvision's decode_jpeg (torchvision with its image ops: "
                           "pip install torchvision matching your torch); use --decode cpu")


def uses_device_decode(decode: str, device: torch.device) -> bool:
    """Whether a run decodes JPEGs on ``device``: ``device`` always, ``auto`` when the encoder is on CUDA and
    torchvision can decode there, ``cpu`` never."""
    check_decode(decode)
    if decode == "cpu":
        return False
    if decode == "device":
        return True
    return device.type == "cuda" and decode_jpeg_available()


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image as EXIF ``orientation`` (1..8) says to show it: what ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:  # mirrored
        return image.flip(-1)
    if orientation == 3:  # upside down
        return image.flip(-2, -1)
    if orientation == 4:  # mirrored upside down
        return image.flip(-2)
    if orientation == 5:  # transposed
        return image.transpose(-2, -1)
    if orientation == 6:  # a quarter turn clockwise to show
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:  # transversed
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # a quarter turn anticlockwise to show
        return image.transpose(-2, -1).flip(-2)
    return image


RESIZE_MODES = ("shortest", "squash")
GROUP = 256  # images resized in one call
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class DevicePreprocess:
    """open_clip's eval transform as tensor operations on any device.

    size: the model's input side. mean, std: per channel, on the 0..1 scale. resize_mode: ``shortest`` (the
    shorter side to ``size`` with the aspect kept, then the centre ``size`` x ``size``; open_clip's default) or
    ``squash`` (both sides to ``size``). interpolation: ``bicubic`` or ``bilinear``, antialiased, each value rounded
    and clamped to 0..255 as PIL writes it into 8 bits.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "DevicePreprocess":
        """The transform of an open_clip model (its image tower's ``preprocess_cfg``); raises ClipdexError for one
        this module does not reproduce (resize mode ``longest``, a non-square input)."""
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mode = cfg.get("resize_mode", "shortest")
        interpolation = cfg.get("interpolation", "bicubic")
        if size[0] != size[1] or mode not in RESIZE_MODES or interpolation not in INTERPOLATIONS:
            raise ClipdexError(f"device decode reproduces square {'/'.join(RESIZE_MODES)} resizing with "
                               f"{'/'.join(INTERPOLATIONS)} interpolation; this model wants size {size}, resize mode "
                               f"{mode}, {interpolation}: use --decode cpu")
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        return cls(size=int(size[0]), mean=tuple(cfg.get("mean", OPENAI_DATASET_MEAN)),
                   std=tuple(cfg.get("std", OPENAI_DATASET_STD)), resize_mode=mode, interpolation=interpolation)

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize, as torchvision's ``Resize(size)`` computes it (the long side
        truncated)."""
        if self.resize_mode == "squash":
            return self.size, self.size
        if width <= height:
            return int(self.size * height / width), self.size
        return self.size, int(self.size * width / height)

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(3, H, W) uint8 images of any sizes, all on one device -> (B, 3, size, size) float32 normalised, there.

        Images of one shape are resized together, ``GROUP`` at a time (a folder of camera photos is a few shapes;
        256 640x480 images are 0.9 GiB as float32)."""
        device = images[0].device
        out = torch.empty((len(images), 3, self.size, self.size), dtype=torch.float32, device=device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape[-2:]), []).append(i)
        chunks = [(shape, idx[a:a + GROUP]) for shape, idx in groups.items() for a in range(0, len(idx), GROUP)]
        for (h, w), idx in chunks:
            x = torch.stack([images[i] for i in idx]).float()  # (G, 3, h, w)
            rh, rw = self.resized_shape(h, w)
            if (rh, rw) != (h, w):
                x = F.interpolate(x, size=(rh, rw), mode=self.interpolation, align_corners=False, antialias=True)
                x = x.clamp_(0, 255).round_()
            top, left = int(round((rh - self.size) / 2.0)), int(round((rw - self.size) / 2.0))
            out[torch.tensor(idx, device=device)] = x[:, :, top:top + self.size, left:left + self.size]
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1) * 255.0
        return out.sub_(mean).div_(std)


class DeviceDecoder:
    """Finishes the decode stage's batches on ``device``: their JPEG bytes decoded, preprocessed and merged with
    the files the workers decoded, in the batch's order; refused JPEGs decoded by the CPU decoder.

    ``transform`` (open_clip's preprocess) and ``max_pixels``/``draft_size`` are the CPU path's, for those
    fall-backs. ``seconds`` keeps the (host) time spent here: on CUDA, kernels still queued when :meth:`finish`
    returns are waited for by the encoder's call that follows."""

    def __init__(self, *, device: torch.device, preprocess: DevicePreprocess, transform: Callable,
                 max_pixels: int, draft_size: int | None = None):
        self.device = torch.device(device)
        self.preprocess = preprocess
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        self.seconds = 0.0
        self.fallbacks = 0  # JPEGs the device decoder refused, decoded (or failed) on the CPU instead

    def finish(self, batch: dict) -> dict:
        """A collated batch (see :func:`clipdex.indexer.decode.collate`) with its ``jpegs`` decoded: ``pixels``
        then holds every decoded file, on the device, rows in the order of ``pos``."""
        jpegs = batch.get("jpegs")
        if not jpegs:
            return batch
        t0 = time.perf_counter()
        views = list(torch.split(jpegs["data"], jpegs["sizes"]))
        decoded = self._decode(views)
        rows = [(p, h, w, ht, "cpu", i) for i, (p, h, w, ht) in
                enumerate(zip(batch["pos"], batch["hash"], batch["width"], batch["height"]))]
        ok, cpu_pixels, errors = [], [], list(batch["errors"])
        for k, image in enumerate(decoded):
            pos, digest = jpegs["pos"][k], jpegs["hash"][k]
            if image is not None:
                ok.append(orient(image, jpegs["orientation"][k]))
                rows.append((pos, digest, jpegs["width"][k], jpegs["height"][k], "device", len(ok) - 1))
                continue
            self.fallbacks += 1
            try:  # what the CPU path would have made of this file
                im, w, h = decode_image(bytes(views[k].numpy()), max_pixels=self.max_pixels,
                                        draft_size=self.draft_size)
                cpu_pixels.append(self.transform(im))
            except Exception as e:  # noqa: BLE001 - one bad file must never stop the run
                errors.append((pos, failure_reason(e)))
                continue
            rows.append((pos, digest, w, h, "fallback", len(cpu_pixels) - 1))
        rows.sort()
        parts = {"cpu": batch["pixels"], "device": self.preprocess(ok) if ok else None,
                 "fallback": torch.stack(cpu_pixels) if cpu_pixels else None}
        offset, start = {}, 0
        for name in ("cpu", "device", "fallback"):
            offset[name] = start
            start += 0 if parts[name] is None else len(parts[name])
        pixels = torch.cat([self._to_device(t) for t in parts.values() if t is not None]) if rows else None
        if pixels is not None:
            order = torch.tensor([offset[src] + i for *_, src, i in rows], device=self.device)
            pixels = pixels.index_select(0, order)
        self.seconds += time.perf_counter() - t0
        return {**batch, "pos": [r[0] for r in rows], "hash": [r[1] for r in rows], "width": [r[2] for r in rows],
                "height": [r[3] for r in rows], "pixels": pixels, "errors": errors, "jpegs": None}

    def _decode(self, views: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decode JPEG byte tensors on the device, together; if the batch call fails, one by one (None: refused)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec's
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return list(decode_jpeg(views, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError as e:
                logger.info("decoding %d JPEGs together on %s failed (%s); decoding them one by one", len(views),
                            self.device, e)
            out = []
            for v in views:
                try:
                    out.append(decode_jpeg(v, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def _to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """CPU pixels to the device through pinned memory, without waiting for the copy."""
        if pixels.device == self.device:
            return pixels
        if self.device.type == "cuda":
            pixels = pixels.pin_memory()
        return pixels.to(self.device, non_blocking=True)


def device_decoder_for(encoder, *, decode: str, max_pixels: int) -> DeviceDecoder | None:
    """The :class:`DeviceDecoder` a run with ``--decode decode`` uses for ``encoder`` (a loaded DualEncoder), or None
    when it decodes on the CPU. ``auto`` logs why it stays on the CPU when the model's transform is not one this
    module reproduces; ``device`` raises then."""
    if not uses_device_decode(decode, encoder.device):
        return None
    try:
        preprocess = DevicePreprocess.for_model(encoder.model)
    except ClipdexError as e:
        if decode == "device":
            raise
        logger.warning("%s; decoding on the CPU", e)
        return None
    return DeviceDecoder(device=encoder.device, preprocess=preprocess, transform=encoder.preprocess,
                         max_pixels=max_pixels, draft_size=encoder.info.image_size)
