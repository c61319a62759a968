"""Decode uploaded PNG/JPEG images and prepare them as the contract's `input` spec says.

resize to (height, width) bilinear -> /255 -> (x - mean) / std -> NCHW float32. Pillow's
bilinear resize antialiases when shrinking, like the exporter's `antialias=True` interpolate,
so served predictions match the exported pipeline up to resampling rounding.

Memory: a 49 KB PNG can hold a 4096x4096 image, so images are decoded one at a time and
shrunk straight to the model's size (JPEG: DCT-domain `draft` scaling while decoding; PNG:
integer `reduce` right after decoding, before any colour conversion), the size is checked
before any pixel is decoded, and a server-wide semaphore bounds how many are decoded at once.
Peak decode memory is therefore `decode_slots x max_image_pixels x 4` bytes, whatever the
number of images or requests.
"""

from __future__ import annotations

import io
import threading
import warnings
from typing import Iterable, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.errors import BadRequest, PayloadTooLarge

FORMATS = ("PNG", "JPEG")


def open_image(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """The image header only (no pixels decoded yet); unreadable or oversized input is a clear 4xx."""
    if not data:
        raise BadRequest(f"{what} is empty", cause="decode")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise BadRequest(f"{what} is not a PNG or JPEG image", cause="decode") from None
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"{what} is too large: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"{what} has {width}x{height} pixels; at most {max_pixels} are accepted")
    return image


def decode_image(data: bytes, max_pixels: int, what: str = "image",
                 target: tuple[int, int] | None = None) -> Image.Image:
    """Decoded image, at no more than about twice `target` (width, height) when given."""
    image = open_image(data, max_pixels, what)
    try:
        if target is not None and image.format == "JPEG":
            image.draft("RGB" if image.mode not in ("L", "1") else "L", target)  # decode at 1/2..1/8 scale
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's ways to say "corrupt/truncated"
        raise BadRequest(f"{what} is corrupt or truncated: {exc}", cause="decode") from exc
    if target is not None:
        factor = min(image.size[0] // (2 * target[0]), image.size[1] // (2 * target[1]))
        if factor > 1 and image.mode not in ("P", "1"):
            image = image.reduce(factor)  # box-average: keeps >= 2x the target for the bilinear pass
    return image


def to_array(image: Image.Image, spec: Mapping) -> np.ndarray:
    """One image -> (H, W, C) float32 in [0, 1] at the model's size."""
    channels, height, width = int(spec["channels"]), int(spec["height"]), int(spec["width"])
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise BadRequest(f"the image endpoint supports 1 or 3 channel models, this one has {channels}")
    resized = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
    return (np.asarray(resized, dtype=np.float32) / 255.0).reshape(height, width, channels)


def normalise(arrays: list[np.ndarray], spec: Mapping) -> np.ndarray:
    """(H, W, C) arrays in [0, 1] -> the (N, C, H, W) float32 normalised input."""
    batch = np.stack(arrays)
    mean = np.asarray(spec["mean"], np.float32).reshape(1, 1, 1, -1)
    std = np.asarray(spec["std"], np.float32).reshape(1, 1, 1, -1)
    return np.ascontiguousarray(((batch - mean) / std).transpose(0, 3, 1, 2), dtype=np.float32)


def preprocess(images: Iterable[Image.Image], spec: Mapping) -> np.ndarray:
    """Images -> (N, C, H, W) float32 normalised input."""
    return normalise([to_array(image, spec) for image in images], spec)


class ImageDecoder:
    """Decodes a request's uploads one at a time under a server-wide bound on concurrent decodes."""

    def __init__(self, spec: Mapping, max_image_pixels: int, max_request_pixels: int, slots: int):
        self.spec = spec
        self.target = (int(spec["width"]), int(spec["height"]))
        self.max_image_pixels, self.max_request_pixels = max_image_pixels, max_request_pixels
        self._slots = threading.BoundedSemaphore(slots)

    def __call__(self, payloads: list[tuple[str, bytes]]) -> np.ndarray:
        """(filename, bytes) uploads -> model input; runs on a worker thread (blocking)."""
        total = 0
        for name, data in payloads:  # every header first: an over-budget request decodes nothing
            width, height = open_image(data, self.max_image_pixels, f"image '{name}'").size
            total += width * height
        if total > self.max_request_pixels:
            raise PayloadTooLarge(f"the images of this request have {total} pixels in all; at most "
                                  f"{self.max_request_pixels} are accepted per request")
        arrays = []
        for name, data in payloads:
            with self._slots:
                image = decode_image(data, self.max_image_pixels, f"image '{name}'", self.target)
                arrays.append(to_array(image, self.spec))
                del image
        return normalise(arrays, self.spec)
