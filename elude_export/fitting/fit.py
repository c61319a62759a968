"""Fit routers from calibration (METHOD.md, "Fitting the routers") and record monitoring baselines.

Per layer: each unit's top-M activations are described by contribution profiles
`w1_j * descriptor` (L2-normalised), clustered by batched spherical k-means, K_j chosen by the
rule in `kmeans.py`; router rows are `mu_jk * w1_j`, so routing is one matmul with the layer
input (`argmax_k <mu_jk, w1_j * x> = argmax_k <mu_jk * w1_j, x>`). A second pass through the
rewritten model measures per-sub-unit statistics on the calibration images.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from elude_export.fitting.calibrate import LayerActivations, collect_activations, context_token_of, model_batches
from elude_export.errors import DataError
from elude_export.fitting.kmeans import select_k
from elude_export.layers.adapters import NeuronLayer, find_layers
from elude_export.models.loading import LoadedModel, fingerprint_model
from elude_export.plan import LayerPlan, Plan
from elude_export.rewrite.modules import apply_plan, disentangled_layers
from elude_export.data.sources import ImageSource

QUANTILE_LEVELS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


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
    unit_chunk: int = 512  # units clustered per batched k-means call (bounds memory)
    seed: int = 0
    layers: list[str] | None = None


@dataclass
class FitReport:
    plan: Plan
    seconds: dict[str, float] = field(default_factory=dict)
    n_images: int = 0


def _profiles(acts: LayerActivations, weights: torch.Tensor, units: slice, device: torch.device) -> torch.Tensor:
    """(units, M, d) L2-normalised contribution profiles w1_j * descriptor."""
    descriptors = acts.unit_descriptors(units).to(device)
    return F.normalize(descriptors * weights[units].to(device)[:, None, :], dim=-1)


def fit_layer(layer: NeuronLayer, acts: LayerActivations, config: FitConfig, device: torch.device) -> LayerPlan:
    """Cluster one layer's units and build its router."""
    weights = layer.unit_weights().float()
    n_units, d_in = weights.shape
    ks, centroids = [], []
    for start in range(0, n_units, config.unit_chunk):
        units = slice(start, min(start + config.unit_chunk, n_units))
        chosen = select_k(
            _profiles(acts, weights, units, device), config.k_max, config.k_rule, config.min_gain,
            config.min_cluster_frac, config.n_iter, config.n_init, config.seed + start,
        )
        ks.append(chosen.k.cpu())
        centroids.append(chosen.centroids.cpu())
    k = torch.cat(ks)
    all_centroids = torch.cat(centroids)
    split = torch.nonzero(k > 1).flatten()
    k_max = int(k.max()) if split.numel() else 1
    split_centroids = all_centroids[split, :k_max].contiguous()
    router = split_centroids * weights[split][:, None, :]
    plan = LayerPlan(layer.path, layer.kind, k.long(), split.long(), router.contiguous(), split_centroids)
    if config.router_rank and split.numel():
        plan.router_a, plan.router_b = low_rank_factors(router.reshape(-1, d_in), config.router_rank)
    return plan


def low_rank_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """matrix (R, d) ~ a (R, r) @ b (r, d) by truncated SVD; routing then costs r*(R+d) per row."""
    rank = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).float().contiguous(), vh[:rank].float().contiguous()


@torch.no_grad()
def subunit_statistics(
    loaded: LoadedModel, plan: Plan, source: ImageSource, config: FitConfig, device: torch.device,
    progress: bool = False,
) -> None:
    """Fill each layer's `stats` from max-pooled taps on calibration images (the monitoring baseline)."""
    rewritten = apply_plan(loaded.model, plan, poolings=("max",), check_fingerprint=False).to(device)
    layers = disentangled_layers(rewritten)
    unit_max: dict[str, list[torch.Tensor]] = {path: [] for path in layers}
    taps: dict[str, list[torch.Tensor]] = {path: [] for path in layers}
    handles = [
        layer.consumer.register_forward_pre_hook(
            lambda _m, args, path=path: unit_max[path].append(
                (args[0] if args[0].ndim == 3 else args[0].unsqueeze(1)).float().amax(1).cpu()))
        for path, layer in layers.items()
    ]
    try:
        dtype = next(rewritten.parameters()).dtype
        for _, batch in model_batches(source, plan.input_spec, config.batch_size, device, dtype,
                                      config.stats_images, progress, "statistics"):
            rewritten(batch)
            for path, layer in layers.items():
                taps[path].append(layer.taps["max"].float().cpu())
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


def fit(
    loaded: LoadedModel,
    source: ImageSource,
    config: FitConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    log: Callable[[str], None] = lambda _msg: None,
) -> FitReport:
    """Calibrate, fit routers for every target layer, measure statistics; return the Plan."""
    config = config or FitConfig()
    if config.k_max < 1:
        raise DataError("k_max must be at least 1")
    device = torch.device(device)
    model = loaded.model.eval().to(device)
    layers = find_layers(model, config.layers)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    acts = collect_activations(
        model, layers, source, loaded.input_spec, config.router, config.top_m, config.per_image_cap,
        config.batch_size, device, config.limit, progress=progress,
    )
    seconds["calibrate"] = time.perf_counter() - started
    n_images = next(iter(acts.values())).n_images
    log(f"calibrated {len(layers)} layer(s) on {n_images} images in {seconds['calibrate']:.1f}s")

    started = time.perf_counter()
    layer_plans = []
    for layer in layers:
        layer_plans.append(fit_layer(layer, acts[layer.path], config, device))
        split = int(layer_plans[-1].split_units.numel())
        log(f"  {layer.path}: {split}/{layer.n_units} units split -> {layer_plans[-1].n_subunits} sub-units")
    seconds["cluster"] = time.perf_counter() - started
    del acts

    plan = Plan(
        layers=layer_plans, model_name=loaded.name, model_fingerprint=fingerprint_model(loaded.model),
        input_spec=loaded.input_spec, router=config.router, context_token=context_token_of(model),
        fit_config={**asdict(config), "n_images": n_images}, quantile_levels=QUANTILE_LEVELS,
    )
    started = time.perf_counter()
    subunit_statistics(loaded, plan, source, config, device, progress)
    seconds["statistics"] = time.perf_counter() - started
    return FitReport(plan, seconds, n_images)
