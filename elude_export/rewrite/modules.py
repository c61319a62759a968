"""Apply a plan: rewrite neuron layers into sub-units without changing any output.

`DisentangledLayer` wraps the original module and swaps its consumer (`fc2`) for a
`SubunitConsumer`; the module's own forward still computes `h`, so whatever the layer family
(Mlp, GluMlp, SwiGLU, custom), the main path is the original computation.

- fused (default): `fc2(h * s[j, route_j])`; with all steers at 1 no multiply is even run in
  PyTorch, and in exported graphs the multiply is by exactly 1.0: bitwise-equal outputs.
- explicit: `fc2` becomes a linear map over the expanded sub-unit vector `u` (each weight
  column repeated K_j times): equal up to float re-association.

Taps (sub-unit activations `u_jk = [route_j = k] * h_j`, before steering) are collected on
every forward into `layer.taps` under `max` / `mean` / `cls` (per image) and `tokens`.
"""

from __future__ import annotations

import copy
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from elude_export.errors import PlanError
from elude_export.layers.adapters import describe_layer
from elude_export.models.loading import fingerprint_model
from elude_export.plan import LayerPlan, Plan, parse_subunit_name

MODES = ("fused", "explicit")
POOLINGS = ("max", "mean", "cls")


class SubunitRouter(nn.Module):
    """Layer input -> index of the active sub-unit of every unit (0 for units that stay whole)."""

    def __init__(self, layer: LayerPlan, router: str, context_token: str, low_rank: bool):
        super().__init__()
        self.router = router
        self.context_token = context_token
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
        if self.router == "context" and x.ndim == 3:
            return x[:, 0] if self.context_token == "cls" else x.mean(1)
        return x

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
            mask = (_columns(token_route, self.parent) == self.sub).to(h.dtype)
            expanded = _columns(tokens, self.parent) * mask
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
                pooled_h = tokens[:, 0] if pooling == "cls" else _pool(tokens, pooling)
                gate = (_columns(token_route[:, 0], self.parent) == self.sub).to(tokens.dtype)
                taps[pooling] = _columns(pooled_h, self.parent) * gate
                continue
            if masked is None:  # u_jk over tokens for each k: (B, N, H) each
                masked = [tokens * (token_route == k).to(tokens.dtype) for k in range(self.k_max)]
            grid = torch.stack([_pool(values, pooling) for values in masked], -1)  # (B, H, Kmax)
            taps[pooling] = _columns(grid.flatten(1), self.grid_column)
        if self.token_taps:
            mask = (_columns(token_route, self.parent) == self.sub).to(tokens.dtype)
            taps["tokens"] = _columns(tokens, self.parent) * mask
        return taps


def _columns(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[..., index]: index_select exports to one ONNX Gather (advanced indexing to GatherND)."""
    return torch.index_select(values, -1, index)


def _pool(values: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, N, X) -> (B, X) over tokens."""
    if pooling == "max":
        return values.amax(1)
    if pooling == "mean":
        return values.mean(1)
    return values[:, 0]


class DisentangledLayer(nn.Module):
    """The original neuron layer with its consumer replaced; same call signature, same outputs."""

    def __init__(self, module: nn.Module, consumer_name: str, layer: LayerPlan, plan: Plan, mode: str,
                 low_rank: bool):
        super().__init__()
        self.path = layer.path
        self.subunit_names = layer.subunit_names()
        self.consumer_name = consumer_name
        self.router = SubunitRouter(layer, plan.router, plan.context_token, low_rank)
        consumer = SubunitConsumer(getattr(module, consumer_name), layer, mode)
        setattr(module, consumer_name, consumer)
        self.inner = module

    @property
    def consumer(self) -> SubunitConsumer:
        return getattr(self.inner, self.consumer_name)

    @property
    def taps(self) -> dict[str, torch.Tensor]:
        return self.consumer.taps

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        consumer = self.consumer
        consumer.route = self.router(x)
        try:
            return self.inner(x, *args, **kwargs)
        finally:
            consumer.route = None


def _check_layer(model_modules: dict[str, nn.Module], layer: LayerPlan) -> tuple[nn.Module, str]:
    module = model_modules.get(layer.path)
    if module is None:
        raise PlanError(f"plan layer '{layer.path}' does not exist in this model")
    described = describe_layer(layer.path, module, explicit=True)
    if described is None:
        raise PlanError(f"plan layer '{layer.path}' is a {module.__class__.__name__}, not a neuron layer")
    if described.n_units != layer.n_units or described.d_in != layer.d_in:
        raise PlanError(
            f"plan layer '{layer.path}' has {layer.n_units} units of input size {layer.d_in}, "
            f"the model's has {described.n_units} of {described.d_in}: plan is for another model"
        )
    return module, described.consumer_name


def apply_plan(
    model: nn.Module,
    plan: Plan,
    mode: str = "fused",
    layers: Iterable[str] | None = None,
    poolings: Iterable[str] = POOLINGS,
    token_taps: bool = False,
    low_rank: bool = True,
    check_fingerprint: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Return `model` with the plan's layers (or the named subset) rewritten into sub-units."""
    if mode not in MODES:
        raise PlanError(f"unknown mode '{mode}' (use {' or '.join(MODES)})")
    if check_fingerprint and fingerprint_model(model) != plan.model_fingerprint:
        raise PlanError(
            f"plan was fitted on other weights (plan model '{plan.model_name}', fingerprint "
            f"{plan.model_fingerprint[:12]}; this model {fingerprint_model(model)[:12]})"
        )
    chosen = [plan.layer(path) for path in layers] if layers is not None else plan.layers
    modules = dict(model.named_modules())
    checked = [(layer, *_check_layer(modules, layer)) for layer in chosen]
    target = model if inplace else copy.deepcopy(model)
    target_modules = dict(target.named_modules())
    for layer, _module, consumer_name in checked:
        wrapped = DisentangledLayer(target_modules[layer.path], consumer_name, layer, plan, mode, low_rank)
        target.set_submodule(layer.path, wrapped)
    configure_taps(target, poolings, token_taps)
    return target.eval()


def disentangled_layers(model: nn.Module) -> dict[str, DisentangledLayer]:
    """The rewritten layers of a model, by plan path."""
    return {m.path: m for m in model.modules() if isinstance(m, DisentangledLayer)}


def configure_taps(model: nn.Module, poolings: Iterable[str] = POOLINGS, token_taps: bool = False,
                   layers: Iterable[str] | None = None) -> None:
    """Choose which taps forward() computes; layers not named compute none."""
    poolings = tuple(poolings)
    unknown = set(poolings) - set(POOLINGS)
    if unknown:
        raise PlanError(f"unknown pooling(s) {sorted(unknown)} (use {', '.join(POOLINGS)})")
    wanted = set(layers) if layers is not None else None
    found = disentangled_layers(model)
    if wanted is not None and wanted - set(found):
        raise PlanError(f"no rewritten layer named {sorted(wanted - set(found))}")
    for path, layer in found.items():
        active = wanted is None or path in wanted
        layer.consumer.poolings = poolings if active else ()
        layer.consumer.token_taps = token_taps and active


def configure_layer_taps(model: nn.Module, taps: Mapping[str, Iterable[str]]) -> None:
    """Per-layer taps, e.g. {"blocks.3.mlp": ("max", "tokens")}; `tokens` is the token-level tap.

    Layers not named compute none, so an export pays only for the taps it exposes.
    """
    found = disentangled_layers(model)
    unknown_layers = set(taps) - set(found)
    if unknown_layers:
        raise PlanError(f"no rewritten layer named {sorted(unknown_layers)}")
    wanted = {path: tuple(names) for path, names in taps.items()}
    for names in wanted.values():
        unknown = set(names) - set(POOLINGS) - {"tokens"}
        if unknown:
            raise PlanError(f"unknown pooling(s) {sorted(unknown)} (use {', '.join(POOLINGS)} or tokens)")
    for path, layer in found.items():
        names = wanted.get(path, ())
        layer.consumer.poolings = tuple(name for name in names if name != "tokens")
        layer.consumer.token_taps = "tokens" in names


def read_taps(model: nn.Module) -> dict[str, torch.Tensor]:
    """Taps of the last forward, named `tap.<layer>.<pooling>`."""
    return {f"tap.{path}.{name}": value
            for path, layer in disentangled_layers(model).items() for name, value in layer.taps.items()}


def set_steers(model: nn.Module, scales: Mapping[str, float]) -> None:
    """Scale named sub-units (`blocks.3.mlp/0042.1`: 0 ablates, 1 is neutral)."""
    layers = disentangled_layers(model)
    updates = []
    for name, value in scales.items():
        path, unit, sub = parse_subunit_name(name)
        layer = layers.get(path)
        if layer is None:
            raise PlanError(f"unknown sub-unit '{name}': layer '{path}' is not rewritten")
        consumer = layer.consumer
        if not 0 <= unit < consumer.offsets.numel():
            raise PlanError(f"unknown sub-unit '{name}': layer has {consumer.offsets.numel()} units")
        k = int((consumer.parent == unit).sum())
        if not 0 <= sub < k:
            raise PlanError(f"unknown sub-unit '{name}': unit {unit} has {k} sub-unit(s)")
        updates.append((consumer, int(consumer.offsets[unit]) + sub, float(value)))
    for consumer, column, value in updates:
        consumer.steer[column] = value
        consumer.steering = bool((consumer.steer != 1).any())


def reset_steers(model: nn.Module) -> None:
    for layer in disentangled_layers(model).values():
        layer.consumer.steer.fill_(1.0)
        layer.consumer.steering = False
