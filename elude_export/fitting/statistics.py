"""Monitoring baselines: per-sub-unit statistics of the image-pooled taps on calibration images.

Per sub-unit: how often it fires (above its unit's quantile threshold), its mean and its
quantiles, on the first `stats_images` calibration images: what the server compares live
traffic against (drift). Two ways to get the taps, which give the same numbers:
- context router, calibrated in this process: a context-routed sub-unit's max-pooled tap is
  its unit's per-image maximum on the images routed to it, 0 elsewhere, so the taps follow from
  what calibration kept (per-unit maxima and context rows) and the fitted routers: no forward;
- otherwise (token router, merged shards, non-float32 models): one pass of the rewritten model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from elude_export.data.sources import ImageSource
from elude_export.fitting.calibrate import LayerActivations
from elude_export.models import LoadedModel, model_batches
from elude_export.plan import LayerPlan, Plan
from elude_export.rewrite import apply_plan, disentangled_layers
from elude_export.rewrite.pooling import gated_columns
from elude_export.rewrite.router import SubunitRouter
from elude_export.vocabulary import IMAGE_POOLING

if TYPE_CHECKING:
    from elude_export.fitting.fit import FitConfig

QUANTILE_LEVELS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def statistics_images(config: FitConfig, n_calibrated: int) -> int:
    """How many (first) calibration images the baselines are measured on."""
    return min(config.stats_images, n_calibrated)


def can_reuse_calibration(plan: Plan, acts: dict[str, LayerActivations], n_images: int) -> bool:
    """Whether calibration kept what the statistics need (the fast path above)."""
    return plan.router == "context" and all(
        acts[layer.path].image_maxima is not None and acts[layer.path].contexts is not None
        and len(acts[layer.path].image_maxima) == n_images for layer in plan.layers)


@torch.no_grad()
def subunit_statistics(
    loaded: LoadedModel, plan: Plan, source: ImageSource, config: FitConfig, device: torch.device,
    progress: bool = False, n_images: int | None = None, calibration: dict[str, LayerActivations] | None = None,
) -> None:
    """Fill each layer's `stats` from image-pooled taps on the first `n_images` images (the monitoring baseline).

    With `calibration` (in-process context-router calibration that kept per-unit maxima) no
    model runs; otherwise the rewritten model is run over the source.
    """
    n_images = config.stats_images if n_images is None else n_images
    if calibration is not None and can_reuse_calibration(plan, calibration, n_images):
        for layer_plan in plan.layers:
            taps, units = _taps_from_calibration(layer_plan, calibration[layer_plan.path], n_images, config.batch_size)
            layer_plan.stats = _summarise(taps, units, layer_plan, config.threshold_quantile)
        return
    taps, units = _taps_from_forward(loaded, plan, source, config.batch_size, device, n_images, progress)
    for layer_plan in plan.layers:
        layer_plan.stats = _summarise(taps[layer_plan.path], units[layer_plan.path], layer_plan,
                                      config.threshold_quantile)


def _taps_from_calibration(
    layer: LayerPlan, acts: LayerActivations, n_images: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S) image-pooled taps and (N, H) unit maxima, from kept maxima, contexts and the router.

    The router runs on the context rows in the batches the rewritten model would see them in,
    with the module the rewritten model uses, so the routes are the served ones.
    """
    assert acts.image_maxima is not None and acts.contexts is not None
    router = SubunitRouter(layer, "context", layer.context_token, low_rank=True)
    parent, sub = layer.columns()
    maxima = acts.image_maxima[:n_images]
    taps = [
        gated_columns(maxima[start:start + batch_size], router(acts.contexts[start:start + batch_size]), parent, sub)
        for start in range(0, n_images, batch_size)
    ]
    return torch.cat(taps), maxima


def _taps_from_forward(
    loaded: LoadedModel, plan: Plan, source: ImageSource, batch_size: int, device: torch.device, n_images: int,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(N, S) image-pooled taps and (N, H) unit maxima per layer, from one pass of the rewritten model."""
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
        for _, batch in model_batches(source, plan.input_spec, batch_size, device, dtype, n_images, progress,
                                      "statistics"):
            rewritten(batch)
            for path, layer in layers.items():
                taps[path].append(layer.taps[IMAGE_POOLING].float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    return ({path: torch.cat(values) for path, values in taps.items()},
            {path: torch.cat(values) for path, values in unit_max.items()})


def _summarise(values: torch.Tensor, units: torch.Tensor, layer: LayerPlan, threshold_quantile: float
               ) -> dict[str, torch.Tensor]:
    """Baseline of one layer from its (N, S) taps and (N, H) unit maxima."""
    parent, _ = layer.columns()
    levels = torch.tensor(QUANTILE_LEVELS)
    threshold = torch.quantile(units, threshold_quantile, dim=0)  # (H,)
    quantiles = torch.quantile(values, levels, dim=0).T.contiguous()  # (S, L)
    bins = torch.searchsorted(quantiles, values.T.contiguous(), right=True)  # (S, N) in 0..L
    # share of images per quantile bin, by counting (a one-hot would be (S, N, L+1))
    counts = torch.zeros(bins.shape[0], len(QUANTILE_LEVELS) + 1).scatter_add_(1, bins, torch.ones(bins.shape))
    return {
        "threshold": threshold,
        "fire_rate": (values > threshold[parent]).float().mean(0),
        "mean": values.mean(0),
        "quantiles": quantiles,
        "bin_fraction": (counts / values.shape[0]).contiguous(),
    }
