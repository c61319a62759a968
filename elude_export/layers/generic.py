"""Layers recognised by shape rather than class: `nn.Sequential` MLPs, and any module the user names."""

from __future__ import annotations

from torch import nn

from elude_export.layers.base import (ELEMENTWISE_ACTIVATIONS, LayerAdapter, NeuronLayer, consumer_width, is_linear,
                                      register_adapter, sequential_parts)
from elude_export.layers.conv import channel_axis_of, is_pointwise_conv, unit_direction


def _linear_children(module: nn.Module) -> list[str]:
    return [name for name, child in module.named_children() if is_linear(child)]


def _pair_children(module: nn.Module) -> list[str]:
    """Names of the Linear children, or else of the 1x1-conv children."""
    linears = _linear_children(module)
    return linears or [name for name, child in module.named_children() if is_pointwise_conv(child)]


@register_adapter
class SequentialMlpAdapter(LayerAdapter):
    """`nn.Sequential(Linear, activation, [Dropout], Linear)` in any model."""

    kind = "sequential"

    def matches(self, module: nn.Module) -> bool:
        children = sequential_parts(module)
        return (
            len(children) == 3
            and is_linear(children[0])
            and isinstance(children[1], ELEMENTWISE_ACTIVATIONS)
            and is_linear(children[2])
            and children[0].out_features == children[2].in_features
        )

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        names = _linear_children(module)
        first, consumer = names[0], names[-1]
        return NeuronLayer(path, module, self.kind, consumer, lambda m: getattr(m, first).weight)


@register_adapter
class ExplicitPairAdapter(LayerAdapter):
    """Any module the user names with `--layers`: its two Linear (or 1x1 conv) children are fc1 and the consumer.

    Only for explicitly requested paths, because we cannot prove from outside that the
    module's forward is elementwise between them; the rewrite's equality check will tell.
    """

    kind = "generic"
    explicit_only = True

    def matches(self, module: nn.Module) -> bool:
        names = _pair_children(module)
        if len(names) != 2:
            return False
        first, second = (getattr(module, name) for name in names)
        return consumer_width(second) == int(first.weight.shape[0])

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        first, consumer = _pair_children(module)
        return NeuronLayer(path, module, self.kind, consumer, lambda m: unit_direction(getattr(m, first)),
                           channel_axis=channel_axis_of(getattr(module, first)))
