"""A rewritten neuron layer: the original module with its consumer swapped, same signature."""

from __future__ import annotations

import torch
from torch import nn

from elude_export.layers import NeuronLayer
from elude_export.plan import LayerPlan, Plan
from elude_export.rewrite.consumer import SubunitConsumer
from elude_export.rewrite.router import SubunitRouter


class DisentangledLayer(nn.Module):
    """The original neuron layer with its consumer replaced; same call signature, same outputs.

    The router reads the layer's input, or, when the family names one (`NeuronLayer.input_name`,
    e.g. a Hugging Face ViTLayer whose MLP input is a norm inside it), the input of that
    submodule, which is then wrapped by a `RoutingInput`.
    """

    def __init__(self, module: nn.Module, described: NeuronLayer, layer: LayerPlan, plan: Plan, mode: str,
                 low_rank: bool):
        super().__init__()
        self.path = layer.path
        self.subunit_names = layer.subunit_names()
        self.consumer_name = described.consumer_name
        self.input_name = described.input_name
        self.router = SubunitRouter(layer, plan.router, layer.context_token, low_rank, described.channel_axis)
        consumer = SubunitConsumer(module.get_submodule(self.consumer_name), layer, mode, described.channel_axis)
        module.set_submodule(self.consumer_name, consumer)
        if self.input_name:
            module.set_submodule(self.input_name, RoutingInput(module.get_submodule(self.input_name), self))
        self.inner = module

    @property
    def consumer(self) -> SubunitConsumer:
        return self.inner.get_submodule(self.consumer_name)

    @property
    def taps(self) -> dict[str, torch.Tensor]:
        return self.consumer.taps

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        consumer = self.consumer
        if not self.input_name:
            consumer.route = self.router(x)
        try:
            return self.inner(x, *args, **kwargs)
        finally:
            consumer.route = None


class RoutingInput(nn.Module):
    """Stands in for the submodule whose input the router reads: routes, then runs it unchanged."""

    def __init__(self, inner: nn.Module, owner: DisentangledLayer):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "owner", owner)  # a back-reference, not a submodule (no cycle in the tree)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.owner.consumer.route = self.owner.router(x)
        return self.inner(x, *args, **kwargs)


def disentangled_layers(model: nn.Module) -> dict[str, DisentangledLayer]:
    """The rewritten layers of a model, by plan path."""
    return {m.path: m for m in model.modules() if isinstance(m, DisentangledLayer)}
