"""The identity of a model's weights: plans and exports name the weights they were fitted on."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def fingerprint_model(model: nn.Module) -> str:
    """sha256 over parameter/buffer names, shapes, dtypes and bytes: identifies the weights a plan fits."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
