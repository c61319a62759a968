"""The consumer: stands in for `fc2`, routes `h` into sub-units, applies steers, records taps.

- fused (default): `fc2(h * s[j, route_j])`; with all steers at 1 no multiply is even run in
  PyTorch, and in exported graphs the multiply is by exactly 1.0: bitwise-equal outputs.
- explicit: `fc2` becomes a linear map over the expanded sub-unit vector `u` (each weight
  column repeated K_j times; for a conv consumer each input channel of its kernel): equal up to
  float re-association.
`fc2` is an `nn.Linear` on (B, H), (B, N, H) or channels-last (B, h, w, H), or an `nn.Conv2d`
on (B, H, h, w); routes, steers and taps are computed on tokens (`layers/layout.py`) and put
back into `h`'s layout, so one code path serves every family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from elude_export.errors import PlanError
from elude_export.layers.layout import CHANNELS_LAST, from_tokens, to_tokens
from elude_export.plan import LayerPlan
from elude_export.rewrite.pooling import gated_columns, pool_tokens, select_columns
from elude_export.vocabulary import MODES, POOLINGS, TOKEN_TAP


class SubunitConsumer(nn.Module):
    """Stands in for `fc2`: routes `h` into sub-units, applies steers, records taps.

    Steers come from the `steer` buffer (`set_steers`) or, in exported graphs, from
    `steer_override`: shape `(S,)` (one steer vector for the batch) or `(Bs, S)` with `Bs` 1 or
    the batch (one per image; what a batching server such as Triton needs).
    """

    def __init__(self, linear: nn.Linear | nn.Conv2d, layer: LayerPlan, mode: str, channel_axis: int = CHANNELS_LAST):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}' (use {' or '.join(MODES)})")
        if mode == "explicit" and isinstance(linear, nn.Conv2d) and linear.groups != 1:
            raise PlanError(f"layer {layer.path}: explicit mode needs an ungrouped consumer conv (this one has "
                            f"{linear.groups} groups); use the fused mode")
        self.mode = mode
        self.linear = linear
        self.channel_axis = channel_axis
        self.k_max = layer.k_max
        parent, sub = layer.columns()
        offsets = layer.unit_offsets()
        self.register_buffer("parent", parent)
        self.register_buffer("sub", sub)
        self.register_buffer("offsets", offsets)
        # sub-unit column c lives at parent*Kmax + sub in a unit-major (H, Kmax) grid, and grid cell
        # (j, k) reads column offsets_j + min(k, K_j - 1): both directions are plain gathers
        self.register_buffer("grid_column", parent * self.k_max + sub)
        ks = layer.k.long()
        self.register_buffer("column_of_cell", (offsets[:, None] + torch.minimum(
            torch.arange(self.k_max)[None, :], ks[:, None] - 1)).reshape(-1))
        self.register_buffer("steer", torch.ones(layer.n_subunits, dtype=linear.weight.dtype))
        if mode == "explicit":
            self.register_buffer("expanded_weight", linear.weight.detach()[:, parent].clone())
        self.poolings: tuple[str, ...] = POOLINGS
        self.token_taps = False
        self.steering = False  # python flag, so unsteered PyTorch forwards skip the multiply
        self.route: torch.Tensor | None = None
        self.steer_override: torch.Tensor | None = None
        self.taps: dict[str, torch.Tensor] = {}

    def tokens(self, h: torch.Tensor) -> torch.Tensor:
        """`h` as (B, tokens, units), whatever the consumer's layout."""
        return to_tokens(h, self.channel_axis)

    def _active_steer(self) -> torch.Tensor | None:
        if self.steer_override is not None:
            return self.steer_override.to(self.steer.dtype)
        return self.steer if self.steering else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        route = self.route
        if route is None:
            raise RuntimeError("SubunitConsumer called outside its DisentangledLayer")
        tokens = self.tokens(h)
        token_route = route if route.ndim == 3 else route.unsqueeze(1)  # context: (B, 1, H)
        if token_route.shape[1] not in (1, tokens.shape[1]):
            raise PlanError(f"token router: the layer's input has {token_route.shape[1]} positions but its units "
                            f"{tokens.shape[1]} (a strided producer); fit this layer with the context router")
        self.taps = self._taps(tokens, token_route)
        steer = self._active_steer()
        if self.mode == "explicit":
            mask = (select_columns(token_route, self.parent) == self.sub).to(h.dtype)  # (B, n, S)
            if steer is not None:
                mask = mask * (steer.to(h.dtype) if steer.ndim == 1 else steer.to(h.dtype).unsqueeze(1))
            expanded = torch.index_select(h, self.channel_axis, self.parent)
            return self._consume(expanded * from_tokens(mask, h, self.channel_axis), self.expanded_weight)
        if steer is not None:
            factor = self._steer_factor(steer.to(h.dtype), token_route)
            return self.linear(h * from_tokens(factor, h, self.channel_axis))
        return self.linear(h)

    def _consume(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The consumer's own operation with another weight (same bias, stride, padding)."""
        if isinstance(self.linear, nn.Conv2d):
            return self.linear._conv_forward(u, weight, self.linear.bias)
        return F.linear(u, weight, self.linear.bias)

    def _steer_factor(self, steer: torch.Tensor, token_route: torch.Tensor) -> torch.Tensor:
        """(B, n, H) scale of each unit's active sub-unit; n is 1 for context routing."""
        if steer.ndim == 1:  # one vector for the batch: a single gather
            return steer[self.offsets + token_route]
        # per image (Bs, S), Bs in {1, B}: sum_k [route == k] * steer[:, column of (j, k)]. Only
        # axis-1 gathers and broadcasting touch the image axis (no reshape, no transpose), so the
        # exported graph accepts a (1, S) default as well as one row per image
        cells = self.column_of_cell.view(-1, self.k_max)
        factor = None
        for k in range(self.k_max):
            term = (token_route == k).to(steer.dtype) * torch.index_select(steer, 1, cells[:, k]).unsqueeze(1)
            factor = term if factor is None else factor + term
        return factor

    def _taps(self, tokens: torch.Tensor, token_route: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled taps without materialising the (B, tokens, S) sub-unit tensor where possible.

        A column of a pooled tap only needs its unit's pooled value and the image's route
        (context routing, or the cls token) or, per token route, one masked reduction per k.
        """
        if not self.poolings and not self.token_taps:
            return {}
        taps: dict[str, torch.Tensor] = {}
        per_image_route = token_route.shape[1] == 1
        masked: list[torch.Tensor] | None = None
        for pooling in self.poolings:
            if pooling == "cls" or per_image_route:
                pooled_h = tokens[:, 0] if pooling == "cls" else pool_tokens(tokens, pooling)
                taps[pooling] = gated_columns(pooled_h, token_route[:, 0], self.parent, self.sub)
                continue
            if masked is None:  # u_jk over tokens for each k: (B, N, H) each
                masked = [tokens * (token_route == k).to(tokens.dtype) for k in range(self.k_max)]
            grid = torch.stack([pool_tokens(values, pooling) for values in masked], -1)  # (B, H, Kmax)
            taps[pooling] = select_columns(grid.flatten(1), self.grid_column)
        if self.token_taps:
            mask = (select_columns(token_route, self.parent) == self.sub).to(tokens.dtype)
            taps[TOKEN_TAP] = select_columns(tokens, self.parent) * mask
        return taps
