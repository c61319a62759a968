"""The original (pre-issue-9) batched spherical k-means, kept only as the baseline benchmarks compare against.

K rule ("gap"): going from K-1 to K clusters must raise the mean cosine-to-centroid by a
larger share of the remaining dispersion than it does on a *null* sample with the same mean
and covariance but no clusters (random Gaussian mixtures of the centred points, the
gap statistic's covariance-matched reference), by at least `min_gain`; and every cluster
must keep at least `min_cluster_frac` of the points. A unit whose activations form one
elongated cloud gains about as much as its null and stays whole (K=1). Rule "fixed" gives
every unit `k_max` sub-units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elude_export.fitting.kmeans import KMeansResult, KSelection  # the same result types as the library


def _plus_plus_init(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on the sphere, batched over units."""
    units, count, _ = points.shape
    batch = torch.arange(units, device=points.device)
    first = torch.randint(count, (units,), generator=generator, device=points.device)
    centroids = [points[batch, first]]
    closest = (points @ centroids[0].unsqueeze(-1)).squeeze(-1)
    for _ in range(1, k):
        distance = (1.0 - closest).clamp_min(0.0) ** 2 + 1e-12
        pick = torch.multinomial(distance, 1, generator=generator).squeeze(-1)
        centroids.append(points[batch, pick])
        closest = torch.maximum(closest, (points @ centroids[-1].unsqueeze(-1)).squeeze(-1))
    return torch.stack(centroids, dim=1)


def _lloyd(points: torch.Tensor, centroids: torch.Tensor, n_iter: int) -> KMeansResult:
    k = centroids.shape[1]
    labels = (points @ centroids.transpose(1, 2)).argmax(-1)
    for _ in range(n_iter):
        onehot = F.one_hot(labels, k).to(points.dtype)
        sums = onehot.transpose(1, 2) @ points
        counts = onehot.sum(1)
        # an empty cluster keeps its previous centroid instead of collapsing to zero
        centroids = torch.where((counts == 0).unsqueeze(-1), centroids, F.normalize(sums, dim=-1))
        new_labels = (points @ centroids.transpose(1, 2)).argmax(-1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    best, labels = (points @ centroids.transpose(1, 2)).max(-1)
    return KMeansResult(centroids, labels, best.mean(-1))


def spherical_kmeans(
    points: torch.Tensor, k: int, n_iter: int = 30, n_init: int = 3, seed: int = 0
) -> KMeansResult:
    """Cluster unit-norm `points` (U, M, d) into `k` groups per unit; best of `n_init` runs per unit."""
    if points.ndim != 3:
        raise ValueError(f"points must be (units, points, dim), got {tuple(points.shape)}")
    points = F.normalize(points.float(), dim=-1)
    generator = torch.Generator(device=points.device).manual_seed(seed)
    best: KMeansResult | None = None
    for _ in range(max(1, n_init)):
        result = _lloyd(points, _plus_plus_init(points, k, generator), n_iter)
        if best is None:
            best = result
            continue
        better = result.objective > best.objective
        best = KMeansResult(
            torch.where(better[:, None, None], result.centroids, best.centroids),
            torch.where(better[:, None], result.labels, best.labels),
            torch.where(better, result.objective, best.objective),
        )
    assert best is not None
    return best


def _null_points(points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A unimodal reference with the points' own mean and covariance.

    Each null point is the mean plus a random Gaussian combination of the centred points, so
    its covariance equals the sample covariance but it has no clusters. (Shuffling coordinates
    independently would also destroy correlations, and any elongated cloud would then beat it.)
    """
    units, count, _ = points.shape
    mean = points.mean(1, keepdim=True)
    mixing = torch.randn(units, count, count, generator=generator, device=points.device) / count ** 0.5
    return F.normalize(mean + mixing @ (points - mean), dim=-1)


def _relative_gain(objectives: list[torch.Tensor]) -> torch.Tensor:
    gains = [torch.zeros_like(objectives[0])]
    for previous, current in zip(objectives[:-1], objectives[1:]):
        gains.append((current - previous) / (1.0 - previous).clamp_min(1e-6))
    return torch.stack(gains, dim=1)


def select_k(
    points: torch.Tensor,
    k_max: int,
    rule: str = "gap",
    min_gain: float = 0.02,
    min_cluster_frac: float = 0.05,
    n_iter: int = 30,
    n_init: int = 3,
    seed: int = 0,
) -> KSelection:
    """Choose K_j in 1..k_max per unit and return the centroids under that K."""
    if rule not in ("gap", "fixed"):
        raise ValueError(f"unknown K rule '{rule}' (use 'gap' or 'fixed')")
    points = F.normalize(points.float(), dim=-1)
    units, count, dim = points.shape
    results = [spherical_kmeans(points, k, n_iter, n_init, seed + k) for k in range(1, k_max + 1)]
    gain = _relative_gain([r.objective for r in results])

    if rule == "fixed":
        chosen = torch.full((units,), k_max, dtype=torch.long, device=points.device)
        null_gain = torch.zeros_like(gain)
    else:
        generator = torch.Generator(device=points.device).manual_seed(seed + 1000)
        null = _null_points(points, generator)
        null_results = [spherical_kmeans(null, k, n_iter, n_init, seed + 100 + k) for k in range(1, k_max + 1)]
        null_gain = _relative_gain([r.objective for r in null_results])
        min_size = max(1, int(round(min_cluster_frac * count)))
        chosen = torch.ones(units, dtype=torch.long, device=points.device)
        still_open = torch.ones(units, dtype=torch.bool, device=points.device)
        for k in range(2, k_max + 1):
            sizes = F.one_hot(results[k - 1].labels, k).sum(1)
            accepted = (gain[:, k - 1] - null_gain[:, k - 1] >= min_gain) & (sizes.min(-1).values >= min_size)
            still_open &= accepted
            chosen = torch.where(still_open, torch.full_like(chosen, k), chosen)

    centroids = torch.zeros(units, k_max, dim, device=points.device)
    labels = torch.zeros(units, count, dtype=torch.long, device=points.device)
    for k in range(1, k_max + 1):
        mask = chosen == k
        if mask.any():
            centroids[mask, :k] = results[k - 1].centroids[mask]
            labels[mask] = results[k - 1].labels[mask]
    return KSelection(chosen, centroids, labels, gain, null_gain)
