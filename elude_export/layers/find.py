"""Find the neuron layers of a model: every registered family, or the modules the user names."""

from __future__ import annotations

import fnmatch
from dataclasses import replace

from torch import nn

from elude_export.errors import LayerMatchError
from elude_export.layers import generic, timm_mlp  # noqa: F401  (importing registers the adapters)
from elude_export.layers.base import ADAPTERS, NeuronLayer
from elude_export.layers.context import context_token_of


def describe_layer(path: str, module: nn.Module, explicit: bool = False) -> NeuronLayer | None:
    """The layer as the first matching adapter sees it; `explicit` admits user-named-only families."""
    # families recognised by class first; the shape-only fallback for user-named modules last
    for adapter in sorted(ADAPTERS, key=lambda a: a.explicit_only):
        if (explicit or not adapter.explicit_only) and adapter.matches(module):
            return adapter.describe(path, module)
    return None


def find_layers(model: nn.Module, patterns: list[str] | tuple[str, ...] | None = None) -> list[NeuronLayer]:
    """All neuron layers of `model`, or those whose path matches one of the glob `patterns`.

    Every pattern must match at least one module, and every matched module must be a neuron
    layer: silent partial matches would fit a different plan from the one the user asked for.
    Each layer carries the routing context it sees (`layers/context.py`).
    """
    return [replace(layer, context_token=context_token_of(model, layer.path)) for layer in _match(model, patterns)]


def _match(model: nn.Module, patterns: list[str] | tuple[str, ...] | None) -> list[NeuronLayer]:
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
