"""Rewrite stage: a Plan applied to an nn.Module, losslessly (router, consumer, taps, steers)."""

from elude_export.rewrite.apply import apply_plan
from elude_export.rewrite.layer import DisentangledLayer, disentangled_layers
from elude_export.rewrite.steers import reset_steers, set_steers
from elude_export.rewrite.taps import configure_layer_taps, configure_taps, read_taps
from elude_export.vocabulary import MODES, POOLINGS

__all__ = ["DisentangledLayer", "MODES", "POOLINGS", "apply_plan", "configure_layer_taps", "configure_taps",
           "disentangled_layers", "read_taps", "reset_steers", "set_steers"]
