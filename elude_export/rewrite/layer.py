"""A rewritten neuron layer: the original module with its consumer swapped, same signature."""

from __future__ import annotations

import torch
from torch import nn

from elude_export.plan import LayerPlan, Plan
from elude_export.rewrite.consumer import SubunitConsumer
from elude_export.rewrite.router import SubunitRouter


class DisentangledLayer(nn.Module):
    """The original neuron layer with its consumer replaced; same call signature, same outputs."""

    def __init__(self, module: nn.Module, consumer_name: str, layer: LayerPlan, plan: Plan, mode: str,
                 low_rank: bool):
        super().__init__()
        self.path = layer.path
        self.subunit_names = layer.subunit_names()
        self.consumer_name = consumer_name
        self.router = SubunitRouter(layer, plan.router, layer.context_token, low_rank)
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


def disentangled_layers(model: nn.Module) -> dict[str, DisentangledLayer]:
    """The rewritten layers of a model, by plan path."""
    return {m.path: m for m in model.modules() if isinstance(m, DisentangledLayer)}
