"""Steer a sub-unit and measure what it does to the model's predictions.

Scaling sub-unit `(j, k)` multiplies unit j's contribution only on the tokens routed to k, so
images are grouped by route: those routed to the sub-unit (where the steer acts) and those
routed only to its siblings (where the output must stay bitwise unchanged). Scaling the
whole unit (every sub-unit) acts on both groups — the contrast is what makes sub-units a
finer, safer steering handle than neurons.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from elude_export.models import model_batches
from elude_export.errors import DataError, PlanError
from elude_export.models import LoadedModel
from elude_export.plan import Plan
from elude_export.vocabulary import IMAGE_POOLING, parse_subunit_name, subunit_name
from elude_export.rewrite import apply_plan, disentangled_layers, reset_steers, set_steers
from elude_export.data.sources import ImageSource


@dataclass
class SteerGroup:
    """Effect of the steer on one group of images."""

    name: str
    images: int = 0
    changed: float = 0.0  # share of images whose logits are not bitwise unchanged
    total_variation: float = 0.0  # mean 0.5 * sum |p_steered - p|
    delta_predicted: float = 0.0  # mean change of the probability of the unsteered prediction
    flips: float = 0.0  # share of images whose top-1 class changes
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    delta_by_class: list[float] = field(default_factory=list)  # mean change of each class probability


@dataclass
class SteerResult:
    subunits: list[str]  # the steered sub-units
    target: str  # the sub-unit whose route defines the groups
    scale: float
    siblings: list[str]
    data: str
    groups: list[SteerGroup]

    def to_json(self) -> dict[str, Any]:
        return {"subunits": self.subunits, "target": self.target, "scale": self.scale, "siblings": self.siblings,
                "data": self.data, "groups": [asdict(g) for g in self.groups]}

    def table(self) -> str:
        what = "whole unit" if len(self.subunits) > 1 else "sub-unit"
        lines = [f"{what} {', '.join(self.subunits)} scaled by {self.scale:g} on {self.data}; groups by the route of "
                 f"{self.target} (siblings: {', '.join(self.siblings) or 'none'})",
                 f"{'group':<28}{'images':>7}{'changed':>9}{'mean TV':>9}{'Δp(pred)':>10}{'flips':>7}"
                 f"{'acc before':>12}{'acc after':>11}"]
        for g in self.groups:
            before = "-" if g.accuracy_before is None else f"{g.accuracy_before:.4f}"
            after = "-" if g.accuracy_after is None else f"{g.accuracy_after:.4f}"
            lines.append(f"{g.name:<28}{g.images:>7}{g.changed:>9.3f}{g.total_variation:>9.3g}"
                         f"{g.delta_predicted:>+10.3g}{g.flips:>7.3f}{before:>12}{after:>11}")
        for g in self.groups:
            if g.images and g.delta_by_class and g.changed > 0:
                order = np.argsort(-np.abs(g.delta_by_class))[:3]
                listed = ", ".join(f"class {int(c)} {g.delta_by_class[c]:+.3g}" for c in order)
                lines.append(f"  most moved class probabilities ({g.name}): {listed}")
        return "\n".join(lines)


def resolve_subunit(plan: Plan, name: str, whole_unit: bool = False) -> tuple[str, int, int, list[str], list[str]]:
    """(layer path, unit, sub, names to steer, sibling names) for a sub-unit name of this plan."""
    path, unit, sub = parse_subunit_name(name)
    layer = plan.layer(path)
    if not 0 <= unit < layer.n_units:
        raise PlanError(f"unknown sub-unit '{name}': layer {path} has {layer.n_units} units")
    k = int(layer.k[unit])
    if not 0 <= sub < k:
        raise PlanError(f"unknown sub-unit '{name}': unit {unit} has {k} sub-unit(s) (0..{k - 1})")
    names = [subunit_name(path, unit, s, layer.n_units) for s in range(k)]
    target = names[sub]
    siblings = [n for n in names if n != target]
    return path, unit, sub, names if whole_unit else [target], siblings


@torch.no_grad()
def steer_effect(
    loaded: LoadedModel, plan: Plan, subunit: str, scale: float, source: ImageSource, whole_unit: bool = False,
    limit: int | None = None, batch_size: int = 64, device: torch.device | str = "cpu",
) -> SteerResult:
    """Compare the rewritten model with and without the steer, grouped by the target's route."""
    device = torch.device(device)
    path, unit, sub, steered, siblings = resolve_subunit(plan, subunit, whole_unit)
    target = subunit if not whole_unit else steered[sub]
    model = apply_plan(loaded.model.eval(), plan, layers=[path], poolings=(IMAGE_POOLING,)).to(device)
    layer = disentangled_layers(model)[path]
    column = int(layer.consumer.offsets[unit]) + sub
    routes: list[torch.Tensor] = []
    hook = layer.router.register_forward_hook(lambda _m, _i, out: routes.append(out[..., unit]))
    dtype = next(model.parameters()).dtype
    collected: dict[str, list[Any]] = {"routed": [], "fires": [], "base": [], "steered": [], "labels": []}
    try:
        for indices, batch in model_batches(source, plan.input_spec, batch_size, device, dtype, limit):
            reset_steers(model)
            routes.clear()
            base = model(batch)
            route = routes[-1]
            routed = (route == sub) if route.ndim == 1 else (route == sub).any(1)
            collected["routed"].append(routed.cpu())
            collected["fires"].append((layer.taps[IMAGE_POOLING][:, column] > 0).cpu())
            set_steers(model, {name: scale for name in steered})
            collected["steered"].append(model(batch).float().cpu())
            collected["base"].append(base.float().cpu())
            if source.labels is not None:
                collected["labels"].append(torch.as_tensor(source.labels[indices]))
    finally:
        hook.remove()
        reset_steers(model)
    if not collected["base"]:
        raise DataError(f"no images in {source.name}")
    routed = torch.cat(collected["routed"])
    fires = torch.cat(collected["fires"])
    base, after = torch.cat(collected["base"]), torch.cat(collected["steered"])
    labels = torch.cat(collected["labels"]) if collected["labels"] else None
    suffix = target.rsplit("/", 1)[1]
    groups = [
        _group(f"routed to {suffix}, firing", routed & fires, base, after, labels),
        _group(f"routed to {suffix}", routed, base, after, labels),
        _group("routed to siblings only", ~routed, base, after, labels),
    ]
    return SteerResult(steered, target, scale, siblings, source.name, groups)


def _group(name: str, mask: torch.Tensor, base: torch.Tensor, after: torch.Tensor,
           labels: torch.Tensor | None) -> SteerGroup:
    group = SteerGroup(name, int(mask.sum()))
    if group.images == 0:
        return group
    b, a = base[mask], after[mask]
    p, q = b.softmax(-1), a.softmax(-1)
    predicted = b.argmax(-1)
    rows = torch.arange(len(b))
    group.changed = float((b != a).any(-1).float().mean())
    group.total_variation = float(0.5 * (q - p).abs().sum(-1).mean())
    group.delta_predicted = float((q[rows, predicted] - p[rows, predicted]).mean())
    group.flips = float((a.argmax(-1) != predicted).float().mean())
    group.delta_by_class = (q - p).mean(0).tolist()
    if labels is not None:
        group.accuracy_before = float((predicted == labels[mask]).float().mean())
        group.accuracy_after = float((a.argmax(-1) == labels[mask]).float().mean())
    return group
