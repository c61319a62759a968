"""Steering a rewritten PyTorch model by sub-unit name (0 ablates, 1 is neutral)."""

from __future__ import annotations

from typing import Mapping

from torch import nn

from elude_export.errors import PlanError
from elude_export.rewrite.layer import disentangled_layers
from elude_export.vocabulary import parse_subunit_name


def set_steers(model: nn.Module, scales: Mapping[str, float]) -> None:
    """Scale named sub-units (`blocks.3.mlp/0042.1`: 0 ablates, 1 is neutral)."""
    layers = disentangled_layers(model)
    updates = []
    for name, value in scales.items():
        path, unit, sub = parse_subunit_name(name)
        layer = layers.get(path)
        if layer is None:
            raise PlanError(f"unknown sub-unit '{name}': layer '{path}' is not rewritten")
        consumer = layer.consumer
        if not 0 <= unit < consumer.offsets.numel():
            raise PlanError(f"unknown sub-unit '{name}': layer has {consumer.offsets.numel()} units")
        k = int((consumer.parent == unit).sum())
        if not 0 <= sub < k:
            raise PlanError(f"unknown sub-unit '{name}': unit {unit} has {k} sub-unit(s)")
        updates.append((consumer, int(consumer.offsets[unit]) + sub, float(value)))
    for consumer, column, value in updates:
        consumer.steer[column] = value
        consumer.steering = bool((consumer.steer != 1).any())


def reset_steers(model: nn.Module) -> None:
    for layer in disentangled_layers(model).values():
        layer.consumer.steer.fill_(1.0)
        layer.consumer.steering = False
