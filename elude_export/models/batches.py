"""Images to model inputs: the one place for preprocessing, and streaming a source to a device."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from elude_export.errors import DataError
from elude_export.data.sources import ImageSource
from elude_export.models.spec import InputSpec


def normalize_images(images: np.ndarray | torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 NHWC (or NCHW) images -> float32 NCHW tensor normalised with the spec's mean/std."""
    array = torch.as_tensor(np.asarray(images))
    if array.ndim == 3:
        array = array.unsqueeze(0)
    if array.ndim != 4:
        raise DataError(f"expected images of shape (N, H, W, C) or (N, C, H, W), got {tuple(array.shape)}")
    if array.shape[-1] == spec.channels and array.shape[1] != spec.channels:
        array = array.permute(0, 3, 1, 2)
    if array.shape[1] != spec.channels:
        raise DataError(f"expected {spec.channels} channels, got image array of shape {tuple(array.shape)}")
    # uint8 is 0..255; float input is taken to be already in 0..1
    scaled = array.float() / 255.0 if not torch.is_floating_point(array) else array.float()
    if tuple(scaled.shape[2:]) != (spec.height, spec.width):
        scaled = torch.nn.functional.interpolate(
            scaled, size=(spec.height, spec.width), mode="bilinear", antialias=True, align_corners=False
        )
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((scaled - mean) / std).contiguous()


def model_batches(
    source: ImageSource, spec: InputSpec, batch_size: int, device: torch.device, dtype: torch.dtype,
    limit: int | None = None, progress: bool = False, description: str = "",
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(image indices, normalised input batch on device) in source order, with a progress bar."""
    from tqdm.auto import tqdm

    total = len(source) if limit is None else min(len(source), limit)
    bar = tqdm(total=total, desc=description, unit="img", disable=not progress, leave=False)
    for indices, images in source.batches(batch_size, limit):
        yield indices, normalize_images(images, spec).to(device=device, dtype=dtype)
        bar.update(len(indices))
    bar.close()
