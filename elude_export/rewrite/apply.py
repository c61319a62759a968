"""Apply a plan: rewrite neuron layers into sub-units without changing any output.

`DisentangledLayer` wraps the original module and swaps its consumer (`fc2`) for a
`SubunitConsumer`; the module's own forward still computes `h`, so whatever the layer family
(Mlp, GluMlp, SwiGLU, custom), the main path is the original computation.

The fused and explicit modes are described in `rewrite/consumer.py`.

Taps (sub-unit activations `u_jk = [route_j = k] * h_j`, before steering) are collected on
every forward into `layer.taps` under `max` / `mean` / `cls` (per image) and `tokens`.
"""

from __future__ import annotations

import copy
from typing import Iterable

from torch import nn

from elude_export.errors import PlanError
from elude_export.layers import NeuronLayer, describe_layer
from elude_export.models import fingerprint_model
from elude_export.plan import LayerPlan, Plan
from elude_export.rewrite.layer import DisentangledLayer
from elude_export.rewrite.taps import configure_taps
from elude_export.vocabulary import MODES, POOLINGS


def _check_layer(model_modules: dict[str, nn.Module], layer: LayerPlan) -> NeuronLayer:
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
    return described


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
    checked = [(layer, _check_layer(modules, layer)) for layer in chosen]
    target = model if inplace else copy.deepcopy(model)
    target_modules = dict(target.named_modules())
    for layer, described in checked:
        wrapped = DisentangledLayer(target_modules[layer.path], described, layer, plan, mode, low_rank)
        target.set_submodule(layer.path, wrapped)
    configure_taps(target, poolings, token_taps)
    return target.eval()
