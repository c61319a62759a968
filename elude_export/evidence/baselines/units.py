"""The original units: the reference every other family of columns is compared with."""

from __future__ import annotations

import torch

from elude_export.evidence.baselines.base import UNITS, Baseline, Columns, SharedForward, image_max, unit_columns
from elude_export.evidence.baselines.registry import register_baseline
from elude_export.plan import LayerPlan


@register_baseline
class UnitsBaseline(Baseline):
    """Each unit's image activation is the max of what the consumer reads from it."""

    name = UNITS
    color = "#4c72b0"

    def observe(self, forward: SharedForward) -> dict[str, torch.Tensor]:
        return {path: image_max(forward.hidden[path]) for path in self.setup.layers}

    def columns(self, layer: LayerPlan) -> Columns:
        return unit_columns(layer)
