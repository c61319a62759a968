"""Fit a plan: calibrate, fit routers for every target layer, record monitoring baselines."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from elude_export.data.sources import ImageSource
from elude_export.errors import DataError
from elude_export.fitting.calibrate import LayerActivations, collect_activations
from elude_export.fitting.memory import PeakMemory
from elude_export.fitting.chunks import auto_unit_chunk
from elude_export.fitting.routers import fit_layer
from elude_export.fitting.statistics import (
    QUANTILE_LEVELS, can_reuse_calibration, statistics_images, subunit_statistics,
)
from elude_export.layers import find_layers, survey_layers
from elude_export.models import LoadedModel, fingerprint_model
from elude_export.plan import Plan


@dataclass
class FitConfig:
    """Every knob of a fit; stored verbatim in the plan."""

    router: str = "context"  # "context" (route by the image's CLS input) or "token"
    top_m: int = 256  # activations per unit to cluster: the top of the range is where concepts separate
    per_image_cap: int = 2  # token router: at most this many tokens of one image per unit
    k_max: int = 8  # measured best on the concept and digits models (README, Evidence); the K rule picks fewer
    k_rule: str = "gap"  # "gap" (null-referenced dispersion gain) or "fixed" (every unit gets k_max)
    min_gain: float = 0.02
    min_cluster_frac: float = 0.05
    n_iter: int = 30
    n_init: int = 3
    router_rank: int | None = None  # store a rank-r factorisation of the routing matrix
    threshold_quantile: float = 0.75  # a sub-unit "fires" when its max activation exceeds this unit quantile
    stats_images: int = 4096
    batch_size: int = 64
    limit: int | None = None  # calibration images to use (None: all)
    unit_chunk: int | None = None  # units per batched k-means call; None: `chunks.auto_unit_chunk` (recorded)
    seed: int = 0
    layers: list[str] | None = None


@dataclass
class FitReport:
    plan: Plan
    seconds: dict[str, float] = field(default_factory=dict)
    n_images: int = 0
    peak_memory_mb: dict[str, float] = field(default_factory=dict)  # "rss" (process), "cuda" (allocated)


def fit(
    loaded: LoadedModel,
    source: ImageSource,
    config: FitConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    log: Callable[[str], None] = lambda _msg: None,
    activations: dict[str, LayerActivations] | None = None,
) -> FitReport:
    """Calibrate, fit routers for every target layer, measure statistics; return the Plan.

    With the context router in float32 the statistics come from what calibration kept, so the
    model runs once; otherwise they take one pass of the rewritten model (`statistics.py`).

    `activations` (from merged calibration parts, `parts.py`) replaces the calibration pass;
    `source` is then used for the statistics pass only.
    """
    config = config or FitConfig()
    if config.k_max < 1:
        raise DataError("k_max must be at least 1")
    device = torch.device(device)
    model = loaded.model.eval().to(device)
    layers = find_layers(model, config.layers)
    log(f"found {len(layers)} neuron layer(s): {', '.join(layer.summary() for layer in layers)}")
    if not config.layers:  # with --layers the user chose; without, say what was left out and why
        for skipped in survey_layers(model, layers):
            log(f"  skipped {skipped.line()}")
    seconds: dict[str, float] = {}
    peak = PeakMemory(device)

    started = time.perf_counter()
    if activations is None:
        # float32 context routing: calibration keeps what the statistics need (no second pass)
        dtype = next(model.parameters()).dtype
        keep_maxima = config.stats_images if config.router == "context" and dtype == torch.float32 else 0
        acts = collect_activations(
            model, layers, source, loaded.input_spec, config.router, config.top_m, config.per_image_cap,
            config.batch_size, device, config.limit, progress=progress, keep_image_maxima=keep_maxima,
        )
        seconds["calibrate"] = time.perf_counter() - started
    else:
        missing = [layer.path for layer in layers if layer.path not in activations]
        if missing:
            raise DataError(f"calibration parts lack layer(s) {', '.join(missing)}")
        acts = activations
    n_images = next(iter(acts.values())).n_images
    if "calibrate" in seconds:
        log(f"calibrated {len(layers)} layer(s) on {n_images} images in {seconds['calibrate']:.1f}s")
    else:
        log(f"calibration of {len(layers)} layer(s) on {n_images} images merged from parts")

    config = replace(config, unit_chunk=config.unit_chunk or auto_unit_chunk(config.top_m, device))
    started = time.perf_counter()
    layer_plans = []
    for layer in layers:
        layer_plans.append(fit_layer(layer, acts[layer.path], config, device))
        split = int(layer_plans[-1].split_units.numel())
        log(f"  {layer.path}: {split}/{layer.n_units} units split -> {layer_plans[-1].n_subunits} sub-units")
    seconds["cluster"] = time.perf_counter() - started
    plan = Plan(
        layers=layer_plans, model_name=loaded.name, model_fingerprint=fingerprint_model(loaded.model),
        input_spec=loaded.input_spec, router=config.router,
        fit_config={**asdict(config), "n_images": n_images}, quantile_levels=QUANTILE_LEVELS,
    )
    n_stats = statistics_images(config, n_images)
    calibration = acts if can_reuse_calibration(plan, acts, n_stats) else None
    del acts  # token descriptors can be GBs; the statistics need only the context-router maxima
    started = time.perf_counter()
    subunit_statistics(loaded, plan, source, config, device, progress, n_stats, calibration=calibration)
    seconds["statistics"] = time.perf_counter() - started
    return FitReport(plan, seconds, n_images, peak.megabytes())
