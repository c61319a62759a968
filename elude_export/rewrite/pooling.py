"""Column selection and token pooling, written so that they export to single cheap ONNX ops."""

from __future__ import annotations

import torch


def select_columns(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[..., index]: index_select exports to one ONNX Gather (advanced indexing to GatherND)."""
    return torch.index_select(values, -1, index)


def pool_tokens(values: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, N, X) -> (B, X) over tokens."""
    if pooling == "max":
        return values.amax(1)
    if pooling == "mean":
        return values.mean(1)
    return values[:, 0]


def gated_columns(pooled: torch.Tensor, route: torch.Tensor, parent: torch.Tensor, sub: torch.Tensor) -> torch.Tensor:
    """(B, H) pooled unit values, (B, H) per-image routes -> (B, S) sub-unit taps.

    A sub-unit's pooled tap is its unit's pooled value on the images routed to it and 0 elsewhere:
    the one rule the consumer's taps and the monitoring statistics (`fitting/statistics.py`) share.
    """
    gate = (select_columns(route, parent) == sub).to(pooled.dtype)
    return select_columns(pooled, parent) * gate
