"""Decode uploaded PNG/JPEG images and prepare them as the contract's `input` spec says.

resize to (height, width) bilinear -> /255 -> (x - mean) / std -> NCHW float32. Pillow's
bilinear resize antialiases when shrinking, like the exporter's `antialias=True` interpolate,
so served predictions match the exported pipeline up to resampling rounding.
"""

from __future__ import annotations

import io
import warnings
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.errors import BadRequest, PayloadTooLarge

FORMATS = ("PNG", "JPEG")


def decode_image(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """Fully decoded image; unreadable, truncated or oversized input is a clear 4xx."""
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
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's ways to say "corrupt/truncated"
        raise BadRequest(f"{what} is corrupt or truncated: {exc}", cause="decode") from exc
    return image


def preprocess(images: Sequence[Image.Image], spec: Mapping) -> np.ndarray:
    """Images -> (N, C, H, W) float32 normalised input."""
    channels, height, width = int(spec["channels"]), int(spec["height"]), int(spec["width"])
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise BadRequest(f"the image endpoint supports 1 or 3 channel models, this one has {channels}")
    arrays = []
    for image in images:
        resized = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
        array = np.asarray(resized, dtype=np.float32) / 255.0
        arrays.append(array.reshape(height, width, channels))
    batch = np.stack(arrays)
    mean = np.asarray(spec["mean"], np.float32).reshape(1, 1, 1, -1)
    std = np.asarray(spec["std"], np.float32).reshape(1, 1, 1, -1)
    return np.ascontiguousarray(((batch - mean) / std).transpose(0, 3, 1, 2), dtype=np.float32)
