"""Find the neuron layers of a model: every registered family, or the modules the user names."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace

from torch import nn

from elude_export.errors import LayerMatchError
from elude_export.layers import conv, generic, hf, timm_mlp  # noqa: F401  (importing registers the adapters)
from elude_export.layers.base import ADAPTERS, ELEMENTWISE_ACTIVATIONS, NeuronLayer
from elude_export.layers.context import context_of


@dataclass(frozen=True)
class SkippedModule:
    """A module that looks like an MLP but is not rewritten, and why: nothing is skipped in silence."""

    path: str
    class_name: str
    reason: str

    def line(self) -> str:
        return f"{self.path} ({self.class_name}): {self.reason}"


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
    return _match(model, patterns)


def _with_context(model: nn.Module, layer: NeuronLayer) -> NeuronLayer | SkippedModule:
    token, reason = context_of(model, layer.path)
    if token is None:
        return SkippedModule(layer.path, layer.module.__class__.__name__, f"no routing context: {reason}")
    return replace(layer, context_token=token)


def _match(model: nn.Module, patterns: list[str] | tuple[str, ...] | None) -> list[NeuronLayer]:
    modules = dict(model.named_modules())
    if not patterns:
        found = [layer for layer in _auto_layers(model, modules) if isinstance(layer, NeuronLayer)]
        if not found:
            skipped = survey_layers(model, [])
            why = f"; skipped: {skipped[0].line()}{' ...' if len(skipped) > 1 else ''}" if skipped else ""
            raise LayerMatchError(
                f"no neuron layer found in {model.__class__.__name__}: expected timm Mlp/GluMlp/SwiGLU, CNN "
                "blocks (conv -> norm -> act -> conv), Hugging Face MLPs or (Linear, activation, Linear) "
                f"blocks; name modules explicitly with --layers{why}"
            )
        return found

    found: list[NeuronLayer] = []
    for pattern in patterns:
        paths = [path for path in modules if path and fnmatch.fnmatchcase(path, pattern)]
        if not paths:
            candidates = [layer.path for layer in _auto_layers(model, modules) if isinstance(layer, NeuronLayer)]
            hint = f"; neuron layers here: {', '.join(candidates[:4])}{' ...' if len(candidates) > 4 else ''}"
            raise LayerMatchError(f"layer pattern '{pattern}' matches no module{hint if candidates else ''}")
        for path in paths:
            layer = describe_layer(path, modules[path], explicit=True)
            if layer is None:
                raise LayerMatchError(
                    f"module '{path}' ({modules[path].__class__.__name__}) matched '{pattern}' "
                    "but is not a neuron layer (needs fc1 -> elementwise activation -> linear consumer)"
                )
            checked = _with_context(model, layer)
            if isinstance(checked, SkippedModule):
                raise LayerMatchError(f"module '{path}' ({checked.class_name}) cannot be routed: {checked.reason}")
            if all(existing.path != path for existing in found):
                found.append(checked)
    return found


def _auto_layers(model: nn.Module, modules: dict[str, nn.Module]) -> list[NeuronLayer | SkippedModule]:
    described = (describe_layer(path, module) for path, module in modules.items() if path)
    return [_with_context(model, layer) for layer in _drop_nested([layer for layer in described if layer is not None])]


def survey_layers(model: nn.Module, found: list[NeuronLayer]) -> list[SkippedModule]:
    """Modules that look like MLPs (by name, or two linear maps around an activation) but are not in
    `found`, each with the reason: refused by the context rule, or matched by no adapter."""
    modules = dict(model.named_modules())
    taken = [layer.path for layer in found]
    inside = lambda path: any(path == t or path.startswith(t + ".") or t.startswith(path + ".") for t in taken)
    skipped: list[SkippedModule] = []
    for item in _auto_layers(model, modules):
        if isinstance(item, SkippedModule) and not inside(item.path):
            skipped.append(item)
    for path, module in modules.items():
        if not path or inside(path) or any(path == s.path or path.startswith(s.path + ".") for s in skipped):
            continue
        if _looks_like_mlp(module):
            children = ", ".join(f"{n}: {c.__class__.__name__}" for n, c in module.named_children())
            skipped.append(SkippedModule(path, module.__class__.__name__,
                                         f"no layer adapter matches ({children}); name it with --layers "
                                         "if its two linear maps are fc1 and the consumer"))
    return skipped


def _looks_like_mlp(module: nn.Module) -> bool:
    """MLP by class name with two linear maps inside, or two linear children around an activation."""
    name = module.__class__.__name__.lower()
    children = list(module.children())
    maps = sum(isinstance(c, (nn.Linear, nn.Conv2d)) for c in children)
    inner_maps = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in module.modules())
    has_act = any(isinstance(c, ELEMENTWISE_ACTIVATIONS) for c in children)
    return (any(word in name for word in ("mlp", "ffn", "feedforward")) and inner_maps >= 2) or (maps >= 2 and has_act)


def _drop_nested(layers: list[NeuronLayer]) -> list[NeuronLayer]:
    """Keep outermost matches so a layer is never rewritten twice."""
    paths = [layer.path for layer in layers]
    return [
        layer for layer in layers
        if not any(layer.path.startswith(other + ".") for other in paths if other != layer.path)
    ]
