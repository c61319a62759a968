"""The `random` control: a real plan with the same K_j whose router rows are random directions.

Random cells of the context space still group similar images, so this control is strong: it
asks whether *fitted* router directions beat arbitrary ones. Applied, the control plan is as
lossless as the fitted one, which the accuracy record checks.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from elude_export.evidence.baselines.base import LogitTally, SharedForward, SubunitBaseline
from elude_export.evidence.baselines.registry import register_baseline
from elude_export.layers import find_layers
from elude_export.plan import LayerPlan, Plan
from elude_export.rewrite import apply_plan, disentangled_layers
from elude_export.vocabulary import IMAGE_POOLING


@register_baseline
class RandomSplitBaseline(SubunitBaseline):
    name = "random"
    color = "#8c8c8c"
    description = "plan with random router directions (lossless, keeps the geometry of the routing space)"
    is_control = True

    def fit(self) -> None:
        setup = self.setup
        self.tally = LogitTally()  # of the control model built here
        control_plan = random_split_plan(setup.plan, setup.model, setup.config.control_seed)
        self.control = apply_plan(setup.model, control_plan, layers=list(setup.layers),
                                  poolings=(IMAGE_POOLING,)).to(setup.device)

    def observe(self, forward: SharedForward) -> dict[str, torch.Tensor]:
        self.tally.update(self.control(forward.batch), forward.logits, forward.labels)
        return {path: layer.taps[IMAGE_POOLING] for path, layer in disentangled_layers(self.control).items()}

    def accuracy(self, n_images: int) -> dict[str, Any]:
        return {"random_control": self.tally.correct / n_images,
                "random_control_logits_bitwise_equal": self.tally.identical}

    @classmethod
    def accuracy_text(cls, accuracy: dict[str, Any]) -> str:
        return f"  random control {accuracy['random_control']:.4f}"


def random_split_plan(plan: Plan, model: nn.Module, seed: int = 0) -> Plan:
    """Same K_j per unit, router rows random: splitting without any fitted information.

    Each split unit gets K_j Gaussian directions in profile space, projected orthogonal to the
    unit's mean centroid (the common direction of its profiles), times `w1_j`. Without that
    projection one random direction would win for almost every image and the "split" would
    be a no-op; with it the images are cut into K_j pieces of comparable size at random.
    The plan is a real plan: applied, it is as lossless as the fitted one.
    """
    generator = torch.Generator().manual_seed(seed)
    weights_of = {layer.path: layer.unit_weights().float().cpu()
                  for layer in find_layers(model, [layer.path for layer in plan.layers])}
    layers = []
    for layer in plan.layers:
        valid = layer.router_valid  # (Hs, Kmax)
        centroids = layer.centroids.float()
        count = valid.sum(1, keepdim=True).clamp_min(1).float()
        common = F.normalize((centroids * valid[..., None]).sum(1) / count, dim=-1)  # (Hs, d)
        directions = torch.randn(centroids.shape, generator=generator)
        directions = directions - (directions * common[:, None, :]).sum(-1, keepdim=True) * common[:, None, :]
        directions = F.normalize(directions, dim=-1) * valid[..., None]
        router = directions * weights_of[layer.path][layer.split_units][:, None, :]
        layers.append(LayerPlan(layer.path, layer.kind, layer.k.clone(), layer.split_units.clone(),
                                router.contiguous(), directions.contiguous(), context_token=layer.context_token))
    control = copy.copy(plan)
    control.layers = layers
    control.fit_config = {**plan.fit_config, "control": f"random directions, seed {seed}"}
    return control
