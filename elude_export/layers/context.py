"""The routing context rule: what an image's context vector is, for calibration and the router alike.

The context router routes every token of an image by one vector: the class token's input to
the layer when the sequence starts with one, else the mean token. Fitting (the descriptors
it clusters) and the rewrite (the router it runs) must use the same rule, so it lives here.
"""

from __future__ import annotations

import torch
from torch import nn


def context_token_of(model: nn.Module, layer_path: str | None = None) -> str:
    """'cls' when the model prepends a class token at index 0, else 'mean'."""
    return "cls" if getattr(model, "cls_token", None) is not None else "mean"


def context_vector(x: torch.Tensor, context_token: str) -> torch.Tensor:
    """(B, N, d) layer input -> (B, d) context of each image."""
    return x[:, 0] if context_token == "cls" else x.mean(1)
