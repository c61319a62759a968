"""Turn uint8 images into the float tensors a model expects (one place for preprocessing)."""

from __future__ import annotations

import numpy as np
import torch

from elude_export.errors import DataError
from elude_export.models.loading import InputSpec


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
