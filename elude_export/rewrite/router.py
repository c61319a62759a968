"""The router: layer input -> the active sub-unit of every unit (METHOD.md, "Routers")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from elude_export.layers import context_vector
from elude_export.layers.layout import CHANNELS_LAST, to_tokens
from elude_export.plan import LayerPlan


class SubunitRouter(nn.Module):
    """Layer input -> index of the active sub-unit of every unit (0 for units that stay whole).

    A feature map input (NCHW or NHWC, per `channel_axis`) is read as tokens = spatial positions.
    """

    def __init__(self, layer: LayerPlan, router: str, context_token: str, low_rank: bool,
                 channel_axis: int = CHANNELS_LAST):
        super().__init__()
        self.router = router
        self.context_token = context_token
        self.channel_axis = channel_axis
        self.n_units = layer.n_units
        self.n_split = int(layer.split_units.numel())
        self.k_max = layer.k_max
        self.register_buffer("split_units", layer.split_units.clone())
        # slot of every unit in [whole, split_0, split_1, ...]: routes are gathered, not scattered
        # (a gather exports to one cheap ONNX Gather; scatter needs a zeros tensor plus ScatterElements)
        slot = torch.zeros(layer.n_units, dtype=torch.long)
        slot[layer.split_units] = torch.arange(1, self.n_split + 1)
        self.register_buffer("slot", slot)
        valid = layer.router_valid.reshape(-1)
        # padded rows (k >= K_j) can never win the argmax
        self.register_buffer("row_bias", torch.where(valid, 0.0, float("-inf")))
        self.low_rank = low_rank and layer.router_a is not None
        if self.low_rank:
            self.register_buffer("weight_a", layer.router_a.float().clone())
            self.register_buffer("weight_b", layer.router_b.float().clone())
        else:
            self.register_buffer("weight", layer.router.reshape(-1, layer.d_in).float().clone())

    def describe(self, x: torch.Tensor) -> torch.Tensor:
        """What routing looks at: the context vector per image, or every token."""
        if self.router == "context" and x.ndim >= 3:
            return context_vector(x, self.context_token, self.channel_axis)
        return to_tokens(x, self.channel_axis) if x.ndim == 4 else x

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n_split, Kmax) routing scores of the split units, -inf on padded rows."""
        described = self.describe(x)
        if self.low_rank:
            scores = (described @ self.weight_b.to(described.dtype).T) @ self.weight_a.to(described.dtype).T
        else:
            scores = described @ self.weight.to(described.dtype).T
        scores = scores + self.row_bias.to(scores.dtype)
        return scores.unflatten(-1, (self.n_split, self.k_max))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_split == 0:
            lead = self.describe(x).shape[:-1]
            return torch.zeros(*lead, self.n_units, dtype=torch.long, device=x.device)
        split_route = self.scores(x).argmax(-1)
        return torch.index_select(F.pad(split_route, (1, 0)), -1, self.slot)
