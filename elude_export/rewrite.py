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
from elude_export.layers import describe_layer
from elude_export.models import fingerprint_model
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        described = self.describe(x)
        lead = described.shape[:-1]
        if self.n_split == 0:
            return torch.zeros(*lead, self.n_units, dtype=torch.long, device=x.device)
        if self.low_rank:
            scores = (described @ self.weight_b.to(described.dtype).T) @ self.weight_a.to(described.dtype).T
        else:
            scores = described @ self.weight.to(described.dtype).T
        scores = scores + self.row_bias.to(scores.dtype)
        split_route = scores.unflatten(-1, (self.n_split, self.k_max)).argmax(-1)
        route = torch.zeros(*lead, self.n_units, dtype=torch.long, device=x.device)
        return route.scatter(-1, self.split_units.expand(*lead, self.n_split), split_route)


class SubunitConsumer(nn.Module):
    """Stands in for `fc2`: routes `h` into sub-units, applies steers, records taps."""

    def __init__(self, linear: nn.Linear, layer: LayerPlan, mode: str):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}' (use {' or '.join(MODES)})")
        self.mode = mode
        self.linear = linear
        parent, sub = layer.columns()
        self.register_buffer("parent", parent)
        self.register_buffer("sub", sub)
        self.register_buffer("offsets", layer.unit_offsets())
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
            mask = (token_route[..., self.parent] == self.sub).to(h.dtype)
            expanded = tokens[..., self.parent] * mask
            if steer is not None:
                expanded = expanded * steer.to(h.dtype)
            out = F.linear(expanded, self.expanded_weight, self.linear.bias)
            return out if h.ndim == 3 else out.squeeze(1)
        if steer is not None:
            factor = steer.to(h.dtype)[self.offsets + token_route]
            return self.linear(h * (factor if h.ndim == 3 else factor.squeeze(1)))
        return self.linear(h)

    def _taps(self, tokens: torch.Tensor, token_route: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.poolings and not self.token_taps:
            return {}
        mask = (token_route[..., self.parent] == self.sub).to(tokens.dtype)
        taps: dict[str, torch.Tensor] = {}
        per_token = self.token_taps or token_route.shape[1] > 1
        expanded = tokens[..., self.parent] * mask if per_token else None
        for pooling in self.poolings:
            if expanded is not None:
                pooled = {"max": lambda: expanded.amax(1), "mean": lambda: expanded.mean(1),
                          "cls": lambda: expanded[:, 0]}[pooling]()
            else:  # context routing: one route per image, so pool h first and expand (B, H) only
                pooled_h = {"max": lambda: tokens.amax(1), "mean": lambda: tokens.mean(1),
                            "cls": lambda: tokens[:, 0]}[pooling]()
                pooled = pooled_h[:, self.parent] * mask[:, 0]
            taps[pooling] = pooled
        if self.token_taps:
            assert expanded is not None
            taps["tokens"] = expanded
        return taps


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
