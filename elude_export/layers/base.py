"""What a neuron layer is, and the registry of adapters that recognise one family each.

A neuron layer is a module whose hidden vector `h` is consumed only linearly by one
`nn.Linear` (the *consumer*, `fc2` in timm). Units are the consumer's input features, so the
rewrite only has to intercept the consumer's input: the module's own forward computes `h`,
and whatever sits between activation and consumer (norm, dropout, a GLU gate) is part of `h`.
An adapter says which child is the consumer and which weights describe a unit's input
direction (for contribution profiles); adapters register with `@register_adapter`, as timm
registers models, so a new family is one class in one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import nn

ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardswish, nn.ReLU6,
    nn.Softplus,
)


@dataclass(frozen=True)
class NeuronLayer:
    """One matched layer: where it lives, its consumer, and how to read its units."""

    path: str
    module: nn.Module
    kind: str
    consumer_name: str
    unit_weight_fn: Callable[[nn.Module], torch.Tensor]
    signed: bool = False  # gated units are signed: rank them by |h|
    context_token: str = "mean"  # the routing context this layer sees (layers/context.py decides)

    @property
    def consumer(self) -> nn.Linear:
        return getattr(self.module, self.consumer_name)

    @property
    def n_units(self) -> int:
        return self.consumer.in_features

    def unit_weights(self) -> torch.Tensor:
        """(n_units, d_in): the input direction of each unit, for contribution profiles."""
        return self.unit_weight_fn(self.module).detach()

    @property
    def d_in(self) -> int:
        return int(self.unit_weights().shape[1])


class LayerAdapter:
    """Recognises one family of neuron layers."""

    kind: str = ""
    # only for modules the user names with --layers: we cannot prove the family from outside
    explicit_only: bool = False

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        raise NotImplementedError


ADAPTERS: list[LayerAdapter] = []
Adapter = TypeVar("Adapter", bound=type[LayerAdapter])


def register_adapter(cls: Adapter) -> Adapter:
    """Class decorator: adapters are tried in registration order, the first match wins."""
    if any(existing.kind == cls.kind for existing in ADAPTERS):
        raise ValueError(f"a layer adapter of kind '{cls.kind}' is already registered")
    ADAPTERS.append(cls())
    return cls


def is_linear(module: object) -> bool:
    return isinstance(module, nn.Linear)
