"""The consumer: stands in for `fc2`, routes `h` into sub-units, applies steers, records taps.

- fused (default): `fc2(h * s[j, route_j])`; with all steers at 1 no multiply is even run in
  PyTorch, and in exported graphs the multiply is by exactly 1.0: bitwise-equal outputs.
- explicit: `fc2` becomes a linear map over the expanded sub-unit vector `u` (each weight
  column repeated K_j times): equal up to float re-association.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from elude_export.plan import LayerPlan
from elude_export.rewrite.pooling import pool_tokens, select_columns
from elude_export.vocabulary import MODES, POOLINGS, TOKEN_TAP


class SubunitConsumer(nn.Module):
    """Stands in for `fc2`: routes `h` into sub-units, applies steers, records taps.

    Steers come from the `steer` buffer (`set_steers`) or, in exported graphs, from
    `steer_override`: shape `(S,)` (one steer vector for the batch) or `(Bs, S)` with `Bs` 1 or
    the batch (one per image; what a batching server such as Triton needs).
    """

    def __init__(self, linear: nn.Linear, layer: LayerPlan, mode: str):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}' (use {' or '.join(MODES)})")
        self.mode = mode
        self.linear = linear
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

    def _active_steer(self) -> torch.Tensor | None:
        if self.steer_override is not None:
            return self.steer_override.to(self.steer.dtype)
        return self.steer if self.steering else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        route = self.route
        if route is None:
            raise RuntimeError("SubunitConsumer called outside its DisentangledLayer")
        tokens = h if h.ndim == 3 else h.unsqueeze(1)
        token_route = route if route.ndim == 3 else route.unsqueeze(1)  # context: (B, 1, H)
        self.taps = self._taps(tokens, token_route)
        steer = self._active_steer()
        if self.mode == "explicit":
            mask = (select_columns(token_route, self.parent) == self.sub).to(h.dtype)
            expanded = select_columns(tokens, self.parent) * mask
            if steer is not None:
                expanded = expanded * (steer.to(h.dtype) if steer.ndim == 1 else steer.to(h.dtype).unsqueeze(1))
            out = F.linear(expanded, self.expanded_weight, self.linear.bias)
            return out if h.ndim == 3 else out.squeeze(1)
        if steer is not None:
            factor = self._steer_factor(steer.to(h.dtype), token_route)
            return self.linear(h * (factor if h.ndim == 3 else factor.squeeze(1)))
        return self.linear(h)

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
                gate = (select_columns(token_route[:, 0], self.parent) == self.sub).to(tokens.dtype)
                taps[pooling] = select_columns(pooled_h, self.parent) * gate
                continue
            if masked is None:  # u_jk over tokens for each k: (B, N, H) each
                masked = [tokens * (token_route == k).to(tokens.dtype) for k in range(self.k_max)]
            grid = torch.stack([pool_tokens(values, pooling) for values in masked], -1)  # (B, H, Kmax)
            taps[pooling] = select_columns(grid.flatten(1), self.grid_column)
        if self.token_taps:
            mask = (select_columns(token_route, self.parent) == self.sub).to(tokens.dtype)
            taps[TOKEN_TAP] = select_columns(tokens, self.parent) * mask
        return taps
