"""Which families of columns an evaluation scores, in the order they are reported.

Like timm's `@register_model`: a baseline file decorates its class with `@register_baseline`
and is imported by the package; nothing else has to know it exists. Registration order is
report order (units first, then ELUDe, its controls, the SAE, then anything added later).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, TypeVar

from elude_export.evidence.baselines.base import Baseline

_REGISTRY: dict[str, type[Baseline]] = {}
RESERVED_INFO_KEYS = ("path", "n_units", "k_counts", "route_balance", "summary")  # layer keys in the JSON

B = TypeVar("B", bound=type[Baseline])


def register_baseline(cls: B) -> B:
    """Class decorator: add a concrete `Baseline` under its `name`; names must be unique."""
    if not (inspect.isclass(cls) and issubclass(cls, Baseline)) or inspect.isabstract(cls):
        raise TypeError(f"{cls!r} is not a concrete Baseline subclass")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} has no name")
    if name in _REGISTRY:
        raise ValueError(f"a baseline named '{name}' is already registered ({_REGISTRY[name].__name__})")
    if cls.info_key in RESERVED_INFO_KEYS:
        raise ValueError(f"{cls.__name__}.info_key '{cls.info_key}' would overwrite a layer field")
    _REGISTRY[name] = cls
    return cls


def unregister_baseline(name: str) -> type[Baseline]:
    """Remove a baseline (tests that register their own must leave the registry as they found it)."""
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise KeyError(f"no baseline named '{name}' is registered") from None


@contextlib.contextmanager
def registered(cls: B) -> Iterator[B]:
    """Register `cls` for the duration of a `with` block only."""
    register_baseline(cls)
    try:
        yield cls
    finally:
        unregister_baseline(cls.name)


def registered_baselines() -> dict[str, type[Baseline]]:
    """The registered baselines by name, in registration order (a copy)."""
    return dict(_REGISTRY)
