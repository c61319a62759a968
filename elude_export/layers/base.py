"""What a neuron layer is, and the registry of adapters that recognise one family each.

A neuron layer is a module whose hidden vector `h` is consumed only linearly by one
`nn.Linear` or `nn.Conv2d` (the *consumer*, `fc2` in timm, `conv2` in a ResNet block). Units are the consumer's input features, so the
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

from elude_export.layers.layout import CHANNELS_LAST, to_tokens

ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardswish, nn.ReLU6,
    nn.Softplus,
)


Consumer = nn.Linear | nn.Conv2d


@dataclass(frozen=True)
class NeuronLayer:
    """One matched layer: where it lives, its consumer, and how to read its units.

    `consumer_name` and `input_name` are dotted paths inside `module` (`output.dense` in a
    Hugging Face ViTLayer); `input_name` names the submodule whose input the units' directions
    apply to (the producer, when the module's own input is not it), "" for the module itself.
    `channel_axis` says where the channels of that input and of `h` live (`layers/layout.py`).
    """

    path: str
    module: nn.Module
    kind: str
    consumer_name: str
    unit_weight_fn: Callable[[nn.Module], torch.Tensor]
    signed: bool = False  # gated units are signed: rank them by |h|
    context_token: str = "mean"  # the routing context this layer sees (layers/context.py decides)
    channel_axis: int = CHANNELS_LAST
    input_name: str = ""
    token_aligned: bool = True  # routing input and units share one grid (False: a strided producer conv)

    @property
    def consumer(self) -> Consumer:
        return self.module.get_submodule(self.consumer_name)

    @property
    def input_module(self) -> nn.Module:
        """The module whose input `x` the router and the contribution profiles read."""
        return self.module.get_submodule(self.input_name) if self.input_name else self.module

    @property
    def n_units(self) -> int:
        return consumer_width(self.consumer)

    def summary(self) -> str:
        return f"{self.path} ({self.kind}, context {self.context_token})"

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's input or hidden tensor as (batch, tokens, channels)."""
        return to_tokens(x, self.channel_axis)

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


def is_consumer_conv(module: object) -> bool:
    """A plain 2-d convolution: linear in its input (any kernel), so it can consume units."""
    return type(module) is nn.Conv2d and module.padding_mode == "zeros"


def sequential_parts(module: nn.Module) -> list[nn.Module]:
    """The children of an `nn.Sequential` that compute (no dropout, no identity); [] for other modules."""
    if not isinstance(module, nn.Sequential):
        return []
    return [c for c in module if not isinstance(c, (nn.Dropout, nn.Identity))]


def consumer_width(consumer: nn.Module) -> int:
    """Input features of a Linear, input channels of a Conv2d: the number of units."""
    return int(consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels)
