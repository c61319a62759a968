"""Find the neuron layers ELUDe applies to.

A neuron layer is a module whose hidden vector `h` is consumed only linearly by one
`nn.Linear` (the *consumer*, `fc2` in timm). Units are the consumer's input features, so the
rewrite only has to intercept the consumer's input: the module's own forward computes `h`,
whatever sits between activation and consumer (norm, dropout, a GLU gate) is part of `h`.
One small adapter per layer family says which child is the consumer and which weights
describe a unit's input direction (used for contribution profiles).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from elude_export.errors import LayerMatchError

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
    """Recognises one family of neuron layers. Subclasses are registered in `ADAPTERS`."""

    kind: str = ""

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        raise NotImplementedError


def _is_linear(module: object) -> bool:
    return isinstance(module, nn.Linear)


class TimmMlpAdapter(LayerAdapter):
    """timm `Mlp` (ViT, DeiT, DINOv2, CLIP ViT) and `GatedMlp` without a gate: h = norm(act(fc1 x))."""

    kind = "mlp"

    def matches(self, module: nn.Module) -> bool:
        from timm.layers import GatedMlp, Mlp

        if isinstance(module, GatedMlp):
            return isinstance(module.gate, nn.Identity) and _is_linear(module.fc1) and _is_linear(module.fc2)
        return isinstance(module, Mlp) and _is_linear(module.fc1) and _is_linear(module.fc2)

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        return NeuronLayer(path, module, self.kind, "fc2", lambda m: m.fc1.weight)


class TimmGluMlpAdapter(LayerAdapter):
    """timm `GluMlp` / `SwiGLUPacked`: fc1 is packed [value, gate]; units are signed."""

    kind = "glu"

    def matches(self, module: nn.Module) -> bool:
        from timm.layers import GluMlp

        return isinstance(module, GluMlp) and _is_linear(module.fc1) and _is_linear(module.fc2)

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        def activated_half(m: nn.Module) -> torch.Tensor:
            # profiles follow the activated (gating) branch: it decides when the unit is on
            first, second = m.fc1.weight.chunk(2, dim=0)
            return second if m.gate_last else first

        return NeuronLayer(path, module, self.kind, "fc2", activated_half, signed=True)


class TimmSwiGLUAdapter(LayerAdapter):
    """timm `SwiGLU` (EVA-02 and others): h = act(fc1_g x) * fc1_x x; units are signed."""

    kind = "swiglu"

    def matches(self, module: nn.Module) -> bool:
        from timm.layers import SwiGLU

        return isinstance(module, SwiGLU)

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        return NeuronLayer(path, module, self.kind, "fc2", lambda m: m.fc1_g.weight, signed=True)


class SequentialMlpAdapter(LayerAdapter):
    """`nn.Sequential(Linear, activation, [Dropout], Linear)` in any model."""

    kind = "sequential"

    def matches(self, module: nn.Module) -> bool:
        if not isinstance(module, nn.Sequential):
            return False
        children = [c for c in module if not isinstance(c, (nn.Dropout, nn.Identity))]
        return (
            len(children) == 3
            and _is_linear(children[0])
            and isinstance(children[1], ELEMENTWISE_ACTIVATIONS)
            and _is_linear(children[2])
            and children[0].out_features == children[2].in_features
        )

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        names = [name for name, child in module.named_children() if _is_linear(child)]
        first, consumer = names[0], names[-1]
        return NeuronLayer(path, module, self.kind, consumer, lambda m: getattr(m, first).weight)


class ExplicitPairAdapter(LayerAdapter):
    """Any module the user names with `--layers`: its two Linear children are fc1 and the consumer.

    Only used for explicitly requested paths, because we cannot prove from outside that the
    module's forward is elementwise between them; the rewrite's equality check will tell.
    """

    kind = "generic"

    def matches(self, module: nn.Module) -> bool:
        linears = [c for c in module.children() if _is_linear(c)]
        return len(linears) == 2 and linears[0].out_features == linears[1].in_features

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        names = [name for name, child in module.named_children() if _is_linear(child)]
        first, consumer = names
        return NeuronLayer(path, module, self.kind, consumer, lambda m: getattr(m, first).weight)


ADAPTERS: list[LayerAdapter] = [TimmMlpAdapter(), TimmGluMlpAdapter(), TimmSwiGLUAdapter(), SequentialMlpAdapter()]
EXPLICIT_ONLY_ADAPTERS: list[LayerAdapter] = [ExplicitPairAdapter()]


def describe_layer(path: str, module: nn.Module, explicit: bool = False) -> NeuronLayer | None:
    adapters = ADAPTERS + (EXPLICIT_ONLY_ADAPTERS if explicit else [])
    for adapter in adapters:
        if adapter.matches(module):
            return adapter.describe(path, module)
    return None


def find_layers(model: nn.Module, patterns: list[str] | tuple[str, ...] | None = None) -> list[NeuronLayer]:
    """All neuron layers of `model`, or those whose path matches one of the glob `patterns`.

    Every pattern must match at least one module, and every matched module must be a neuron
    layer: silent partial matches would fit a different plan from the one the user asked for.
    """
    modules = dict(model.named_modules())
    if not patterns:
        found = _auto_layers(modules)
        if not found:
            raise LayerMatchError(
                f"no neuron layer found in {model.__class__.__name__}: expected timm Mlp/GluMlp/SwiGLU "
                "or (Linear, activation, Linear) blocks; name modules explicitly with --layers"
            )
        return found

    found: list[NeuronLayer] = []
    for pattern in patterns:
        paths = [path for path in modules if path and fnmatch.fnmatchcase(path, pattern)]
        if not paths:
            candidates = [layer.path for layer in _auto_layers(modules)]
            hint = f"; neuron layers here: {', '.join(candidates[:4])}{' ...' if len(candidates) > 4 else ''}"
            raise LayerMatchError(f"layer pattern '{pattern}' matches no module{hint if candidates else ''}")
        for path in paths:
            layer = describe_layer(path, modules[path], explicit=True)
            if layer is None:
                raise LayerMatchError(
                    f"module '{path}' ({modules[path].__class__.__name__}) matched '{pattern}' "
                    "but is not a neuron layer (needs fc1 -> elementwise activation -> linear consumer)"
                )
            if all(existing.path != path for existing in found):
                found.append(layer)
    return found


def _auto_layers(modules: dict[str, nn.Module]) -> list[NeuronLayer]:
    described = (describe_layer(path, module) for path, module in modules.items() if path)
    return _drop_nested([layer for layer in described if layer is not None])


def _drop_nested(layers: list[NeuronLayer]) -> list[NeuronLayer]:
    """Keep outermost matches so a layer is never rewritten twice."""
    paths = [layer.path for layer in layers]
    return [
        layer for layer in layers
        if not any(layer.path.startswith(other + ".") for other in paths if other != layer.path)
    ]
