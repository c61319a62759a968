"""Routers from calibration (METHOD.md, "Fitting the routers").

Each unit's top-M activations are described by contribution profiles `w1_j * descriptor`
(L2-normalised), clustered by batched spherical k-means with K_j chosen by the rule in
`kmeans.py`; router rows are `mu_jk * w1_j`, so routing is one matmul with the layer input
(`argmax_k <mu_jk, w1_j * x> = argmax_k <mu_jk * w1_j, x>`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from elude_export.fitting.calibrate import LayerActivations
from elude_export.fitting.chunks import auto_unit_chunk, map_chunks
from elude_export.fitting.kmeans import select_k
from elude_export.layers import NeuronLayer
from elude_export.plan import LayerPlan

if TYPE_CHECKING:
    from elude_export.fitting.fit import FitConfig


def _profiles(acts: LayerActivations, weights: torch.Tensor, units: slice, device: torch.device) -> torch.Tensor:
    """(units, M, d) contribution profiles w1_j * descriptor, not yet normalised (`select_k` does it once)."""
    descriptors = acts.unit_descriptors(units).to(device)
    return descriptors * weights[units].to(device)[:, None, :]  # not in place: token descriptors are a view


def fit_layer(layer: NeuronLayer, acts: LayerActivations, config: FitConfig, device: torch.device) -> LayerPlan:
    """Cluster one layer's units and build its router."""
    weights = layer.unit_weights().float()
    n_units, d_in = weights.shape
    chunk = config.unit_chunk or auto_unit_chunk(config.top_m, device)

    def fit_chunk(start: int) -> tuple[torch.Tensor, torch.Tensor]:
        units = slice(start, min(start + chunk, n_units))
        chosen = select_k(
            _profiles(acts, weights, units, device), config.k_max, config.k_rule, config.min_gain,
            config.min_cluster_frac, config.n_iter, config.n_init, config.seed + start,
        )
        return chosen.k.cpu(), chosen.centroids.cpu()

    ks, centroids = zip(*map_chunks(fit_chunk, range(0, n_units, chunk), device))
    k = torch.cat(ks)
    all_centroids = torch.cat(centroids)
    split = torch.nonzero(k > 1).flatten()
    k_max = int(k.max()) if split.numel() else 1
    split_centroids = all_centroids[split, :k_max].contiguous()
    router = split_centroids * weights[split][:, None, :]
    plan = LayerPlan(layer.path, layer.kind, k.long(), split.long(), router.contiguous(), split_centroids,
                     context_token=layer.context_token)
    if config.router_rank and split.numel():
        plan.router_a, plan.router_b = low_rank_factors(router.reshape(-1, d_in), config.router_rank)
    return plan


def low_rank_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """matrix (R, d) ~ a (R, r) @ b (r, d) by truncated SVD; routing then costs r*(R+d) per row."""
    rank = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).float().contiguous(), vh[:rank].float().contiguous()
