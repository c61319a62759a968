"""Layers recognised by shape rather than class: `nn.Sequential` MLPs, and any module the user names."""

from __future__ import annotations

from torch import nn

from elude_export.layers.base import ELEMENTWISE_ACTIVATIONS, LayerAdapter, NeuronLayer, is_linear, register_adapter


def _linear_children(module: nn.Module) -> list[str]:
    return [name for name, child in module.named_children() if is_linear(child)]


@register_adapter
class SequentialMlpAdapter(LayerAdapter):
    """`nn.Sequential(Linear, activation, [Dropout], Linear)` in any model."""

    kind = "sequential"

    def matches(self, module: nn.Module) -> bool:
        if not isinstance(module, nn.Sequential):
            return False
        children = [c for c in module if not isinstance(c, (nn.Dropout, nn.Identity))]
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
    """Any module the user names with `--layers`: its two Linear children are fc1 and the consumer.

    Only for explicitly requested paths, because we cannot prove from outside that the
    module's forward is elementwise between them; the rewrite's equality check will tell.
    """

    kind = "generic"
    explicit_only = True

    def matches(self, module: nn.Module) -> bool:
        linears = [c for c in module.children() if is_linear(c)]
        return len(linears) == 2 and linears[0].out_features == linears[1].in_features

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        first, consumer = _linear_children(module)
        return NeuronLayer(path, module, self.kind, consumer, lambda m: getattr(m, first).weight)
