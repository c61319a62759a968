"""Where a layer's channels live, and the one conversion to (batch, tokens, channels).

Every stage after `layers/` (calibration, router, consumer, taps) works on token-major
`(B, N, C)` tensors: a ViT's tokens, a CNN's spatial positions (NCHW, channel axis 1) or a
channels-last feature map (NHWC, channel axis -1). Keeping the conversion here, keyed by the
layer's `channel_axis`, avoids special cases spread over the stages.
"""

from __future__ import annotations

import torch

CHANNELS_LAST = -1  # (B, C), (B, N, C) or (B, H, W, C)
CHANNELS_FIRST = 1  # (B, C, H, W): a conv feature map


def to_tokens(x: torch.Tensor, channel_axis: int = CHANNELS_LAST) -> torch.Tensor:
    """(B, C) | (B, N, C) | (B, H, W, C) | (B, C, H, W) -> (B, tokens, C)."""
    if x.ndim == 2:
        return x.unsqueeze(1)
    if x.ndim == 3:
        return x
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2) if channel_axis == CHANNELS_FIRST else x.flatten(1, 2)
    raise ValueError(f"cannot read tokens from a tensor of shape {tuple(x.shape)}")


def from_tokens(t: torch.Tensor, like: torch.Tensor, channel_axis: int = CHANNELS_LAST) -> torch.Tensor:
    """Inverse of `to_tokens` for `t` (B, n, C) with n the tokens of `like` or 1 (broadcast per image)."""
    if like.ndim == 2:
        return t.squeeze(1)
    if like.ndim == 3:
        return t
    per_image = t.shape[1] == 1
    if channel_axis == CHANNELS_FIRST:
        if per_image:
            return t[:, 0, :, None, None]
        return t.transpose(1, 2).unflatten(2, (like.shape[2], like.shape[3]))
    if per_image:
        return t[:, :, None, :]
    return t.unflatten(1, (like.shape[1], like.shape[2]))
