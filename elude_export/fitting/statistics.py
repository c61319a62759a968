"""Monitoring baselines: per-sub-unit statistics of the image-pooled taps on calibration images.

A second pass through the rewritten model measures, per sub-unit, how often it fires (above
its unit's quantile threshold), its mean and its quantiles: what the server compares live
traffic against (drift).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from elude_export.data.sources import ImageSource
from elude_export.models import LoadedModel, model_batches
from elude_export.plan import Plan
from elude_export.rewrite import apply_plan, disentangled_layers
from elude_export.vocabulary import IMAGE_POOLING

if TYPE_CHECKING:
    from elude_export.fitting.fit import FitConfig

QUANTILE_LEVELS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


@torch.no_grad()
def subunit_statistics(
    loaded: LoadedModel, plan: Plan, source: ImageSource, config: FitConfig, device: torch.device,
    progress: bool = False,
) -> None:
    """Fill each layer's `stats` from image-pooled taps on calibration images (the monitoring baseline)."""
    rewritten = apply_plan(loaded.model, plan, poolings=(IMAGE_POOLING,), check_fingerprint=False).to(device)
    layers = disentangled_layers(rewritten)
    unit_max: dict[str, list[torch.Tensor]] = {path: [] for path in layers}
    taps: dict[str, list[torch.Tensor]] = {path: [] for path in layers}
    handles = [
        layer.consumer.register_forward_pre_hook(
            lambda _m, args, path=path: unit_max[path].append(
                layers[path].consumer.tokens(args[0]).float().amax(1).cpu()))
        for path, layer in layers.items()
    ]
    try:
        dtype = next(rewritten.parameters()).dtype
        for _, batch in model_batches(source, plan.input_spec, config.batch_size, device, dtype,
                                      config.stats_images, progress, "statistics"):
            rewritten(batch)
            for path, layer in layers.items():
                taps[path].append(layer.taps[IMAGE_POOLING].float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    levels = torch.tensor(QUANTILE_LEVELS)
    for layer_plan in plan.layers:
        values = torch.cat(taps[layer_plan.path])  # (N, S)
        units = torch.cat(unit_max[layer_plan.path])  # (N, H)
        parent, _ = layer_plan.columns()
        threshold = torch.quantile(units, config.threshold_quantile, dim=0)  # (H,)
        quantiles = torch.quantile(values, levels, dim=0).T.contiguous()  # (S, L)
        bins = torch.searchsorted(quantiles, values.T.contiguous(), right=True)  # (S, N) in 0..L
        fraction = F.one_hot(bins, len(QUANTILE_LEVELS) + 1).float().mean(1)
        layer_plan.stats = {
            "threshold": threshold,
            "fire_rate": (values > threshold[parent]).float().mean(0),
            "mean": values.mean(0),
            "quantiles": quantiles,
            "bin_fraction": fraction.contiguous(),
        }
