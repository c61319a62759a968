"""Which taps a rewritten model computes, and reading them under their contract names."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from elude_export.errors import PlanError
from elude_export.rewrite.layer import disentangled_layers
from elude_export.vocabulary import POOLINGS, TOKEN_TAP, tap_output_name


def configure_taps(model: nn.Module, poolings: Iterable[str] = POOLINGS, token_taps: bool = False,
                   layers: Iterable[str] | None = None) -> None:
    """Choose which taps forward() computes; layers not named compute none."""
    poolings = tuple(poolings)
    unknown = set(poolings) - set(POOLINGS)
    if unknown:
        raise PlanError(f"unknown pooling(s) {sorted(unknown)} (use {', '.join(POOLINGS)})")
    wanted = set(layers) if layers is not None else None
    found = disentangled_layers(model)
    if wanted is not None and wanted - set(found):
        raise PlanError(f"no rewritten layer named {sorted(wanted - set(found))}")
    for path, layer in found.items():
        active = wanted is None or path in wanted
        layer.consumer.poolings = poolings if active else ()
        layer.consumer.token_taps = token_taps and active


def configure_layer_taps(model: nn.Module, taps: Mapping[str, Iterable[str]]) -> None:
    """Per-layer taps, e.g. {"blocks.3.mlp": ("max", "tokens")}; `tokens` is the token-level tap.

    Layers not named compute none, so an export pays only for the taps it exposes.
    """
    found = disentangled_layers(model)
    unknown_layers = set(taps) - set(found)
    if unknown_layers:
        raise PlanError(f"no rewritten layer named {sorted(unknown_layers)}")
    wanted = {path: tuple(names) for path, names in taps.items()}
    for names in wanted.values():
        unknown = set(names) - set(POOLINGS) - {TOKEN_TAP}
        if unknown:
            raise PlanError(f"unknown pooling(s) {sorted(unknown)} (use {', '.join(POOLINGS)} or tokens)")
    for path, layer in found.items():
        names = wanted.get(path, ())
        layer.consumer.poolings = tuple(name for name in names if name != TOKEN_TAP)
        layer.consumer.token_taps = TOKEN_TAP in names


def read_taps(model: nn.Module) -> dict[str, torch.Tensor]:
    """Taps of the last forward, named `tap.<layer>.<pooling>`."""
    return {tap_output_name(path, name): value
            for path, layer in disentangled_layers(model).items() for name, value in layer.taps.items()}
