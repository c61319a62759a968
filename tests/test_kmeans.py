"""Batched spherical k-means recovers planted clusters; the K rule keeps structureless units whole."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elude_export.fitting.kmeans import select_k, spherical_kmeans


def _planted(units: int, points: int, dim: int, k: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(units, k, dim, generator=generator), dim=-1)
    labels = torch.randint(k, (units, points), generator=generator)
    data = centers.gather(1, labels[..., None].expand(-1, -1, dim)) + noise * torch.randn(units, points, dim, generator=generator)
    return data, labels


def _agreement(found: torch.Tensor, truth: torch.Tensor, k: int) -> torch.Tensor:
    """Share of points whose found cluster's majority true label equals their own (per unit)."""
    scores = []
    for f, t in zip(found, truth):
        table = torch.zeros(k, k).index_put_((f, t), torch.ones_like(f, dtype=torch.float), accumulate=True)
        scores.append(table.max(1).values.sum() / len(f))
    return torch.stack(scores)


def test_recovers_planted_clusters_for_all_units_at_once() -> None:
    data, labels = _planted(units=16, points=200, dim=32, k=3, noise=0.15, seed=0)
    result = spherical_kmeans(data, 3, seed=1)
    assert result.centroids.shape == (16, 3, 32)
    assert torch.allclose(result.centroids.norm(dim=-1), torch.ones(16, 3), atol=1e-5)
    assert _agreement(result.labels, labels, 3).min() > 0.95


def test_gap_rule_splits_structured_and_keeps_structureless_whole() -> None:
    planted, _ = _planted(units=12, points=256, dim=48, k=3, noise=0.2, seed=2)
    generator = torch.Generator().manual_seed(3)
    common = F.normalize(torch.randn(12, 1, 48, generator=generator), dim=-1)
    structureless = common + 0.4 * torch.randn(12, 256, 48, generator=generator)
    chosen = select_k(torch.cat([planted, structureless]), k_max=4, rule="gap")
    assert chosen.k[:12].tolist() == [3] * 12
    assert chosen.k[12:].tolist() == [1] * 12
    # centroid rows beyond K_j are zero padding
    assert torch.all(chosen.centroids[:12, 3] == 0)


def test_fixed_rule_and_determinism() -> None:
    data, _ = _planted(units=4, points=64, dim=16, k=2, noise=0.3, seed=4)
    first = select_k(data, k_max=3, rule="fixed", seed=7)
    second = select_k(data, k_max=3, rule="fixed", seed=7)
    assert first.k.tolist() == [3, 3, 3, 3]
    assert torch.equal(first.centroids, second.centroids) and torch.equal(first.labels, second.labels)


def test_min_cluster_size_blocks_tiny_splits() -> None:
    generator = torch.Generator().manual_seed(5)
    base = F.normalize(torch.randn(1, 1, 24, generator=generator), dim=-1)
    outlier = F.normalize(torch.randn(1, 1, 24, generator=generator), dim=-1)
    data = base + 0.05 * torch.randn(1, 200, 24, generator=generator)
    data[:, :3] = outlier + 0.05 * torch.randn(1, 3, 24, generator=generator)  # 1.5% of the points
    assert select_k(data, k_max=3, rule="gap", min_cluster_frac=0.05).k.tolist() == [1]


def test_elongated_unimodal_clouds_stay_whole() -> None:
    """Anisotropy alone is not cluster structure: the null has the same covariance."""
    generator = torch.Generator().manual_seed(6)
    mean = F.normalize(torch.randn(16, 1, 64, generator=generator), dim=-1)
    rotation = torch.linalg.qr(torch.randn(16, 64, 64, generator=generator))[0]
    cloud = mean + 0.3 * (torch.randn(16, 256, 64, generator=generator) * torch.logspace(0, -2, 64)) @ rotation
    assert select_k(cloud, k_max=4, rule="gap").k.tolist() == [1] * 16


def test_gram_and_point_routes_give_the_same_products() -> None:
    """d > M/2 clusters through the Gram matrix, small d through the points: the same inner products."""
    from elude_export.fitting.kmeans import _Points

    data, _ = _planted(units=5, points=40, dim=128, k=3, noise=0.1, seed=8)
    points = F.normalize(data, dim=-1)
    weights = torch.rand(5, 3, 40, generator=torch.Generator().manual_seed(1))
    by_gram, by_points = _Points.of(points), _Points(points, None)
    assert by_gram.gram is not None
    assert torch.allclose(by_gram.inner(weights), by_points.inner(weights), atol=1e-4)


def test_centroids_are_exact_in_profile_space() -> None:
    """d > M: k-means runs on the (M, M) Gram matrix; centroids are the clusters' mean directions."""
    data, _ = _planted(units=6, points=40, dim=128, k=3, noise=0.1, seed=8)
    points = F.normalize(data, dim=-1)
    result = spherical_kmeans(data, 3, seed=1)
    onehot = F.one_hot(result.labels, 3).float().transpose(1, 2)
    assert torch.allclose(result.centroids, F.normalize(onehot @ points, dim=-1), atol=1e-5)
    cosines = (points @ result.centroids.transpose(1, 2)).max(-1).values.mean(-1)
    assert torch.allclose(cosines, result.objective, atol=1e-5)


def test_duplicate_points_keep_centroids_exact() -> None:
    """A rank-deficient Gram matrix (repeated profiles) needs no factorisation and stays exact."""
    data, _ = _planted(units=3, points=20, dim=64, k=2, noise=0.1, seed=9)
    data = torch.cat([data, data], dim=1)  # every profile twice: Gram of rank <= 20 < M = 40
    points = F.normalize(data, dim=-1)
    result = spherical_kmeans(data, 2, seed=1)
    assert torch.isfinite(result.centroids).all()
    onehot = F.one_hot(result.labels, 2).float().transpose(1, 2)
    assert torch.allclose(result.centroids, F.normalize(onehot @ points, dim=-1), atol=1e-5)
    assert torch.equal(result.labels[:, :20], result.labels[:, 20:])  # twins land together
