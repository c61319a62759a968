"""Batched spherical k-means and the choice of K per unit.

All units of a layer are clustered at once as one batched tensor computation, so fitting a
3072-unit layer is a handful of batched matmuls (GPU-capable), not a python loop.

Why it is cheap (METHOD.md, "Cost"): spherical k-means only needs the cosines between a
unit's M profiles and the sums of its clusters. A centroid is therefore kept as *weights over
the points* (a cluster's membership row; a seed is one point), never as a d-vector: every
Lloyd step is one batched product `weights @ gram` with the unit's `(M, M)` Gram matrix, and
the centroid's norm comes out of the same product. When d is small next to M the product goes
through the points instead (`(weights @ points) @ points^T`, same numbers, fewer flops). The
d-dimensional centroids are formed once, at the end, as normalised member sums: exact, with no
factorisation and no jitter. K grows by warm start: the K solution starts from the K-1 one
plus one k-means++ pick (best of `n_init` picks per unit); Lloyd stops per unit at
convergence; a unit leaves the K loop at its first rejected K, so its null is never clustered
beyond that, and the null's `n_init` draws stop for a unit as soon as one of them already
rejects it (the best-of-n null gain can only rise).

K rule ("gap"): going from K-1 to K clusters must raise the mean cosine-to-centroid by a
larger share of the remaining dispersion than it does on a *null* sample with the same mean
and covariance but no clusters (random Gaussian mixtures of the centred points, the
gap statistic's covariance-matched reference), by at least `min_gain`; and every cluster
must keep at least `min_cluster_frac` of the points. A unit whose activations form one
elongated cloud gains about as much as its null and stays whole (K=1). Rule "fixed" gives
every unit `k_max` sub-units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

K_RULES = ("gap", "fixed")
CONVERGED_GAIN = 1e-6  # Lloyd stops for a unit whose mean cosine rose by less than this
_TINY = 1e-12  # floor of a squared cluster-sum norm (a sum of unit vectors that cancels out)


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (U, K, d), unit norm
    labels: torch.Tensor  # (U, M) cluster index per point
    objective: torch.Tensor  # (U,) mean cosine similarity of points to their centroid


@dataclass
class KSelection:
    k: torch.Tensor  # (U,) chosen K per unit
    centroids: torch.Tensor  # (U, k_max, d); rows >= k[u] are zero
    labels: torch.Tensor  # (U, M) labels under the chosen K
    gain: torch.Tensor  # (U, k_max) relative dispersion gain per K (index 0 unused; 0 beyond a unit's first rejection)
    null_gain: torch.Tensor  # (U, k_max) the same on the null points (at a rejecting K, maybe from fewer draws)


class _Points:
    """A batch of units' unit-norm points, seen only through inner products with weighted point sums."""

    def __init__(self, points: torch.Tensor | None, gram: torch.Tensor | None):
        self.points = points  # (U, M, d); None for a null known only by its Gram matrix
        self.gram = gram  # (U, M, M); None when products are cheaper through the points

    @classmethod
    def of(cls, points: torch.Tensor) -> "_Points":
        _, count, dim = points.shape
        # per Lloyd step the Gram route costs K*M*M, the point route 2*K*M*d
        return cls(points, points @ points.transpose(1, 2) if 2 * dim > count else None)

    def take(self, index: torch.Tensor) -> "_Points":
        pick = (lambda t: None if t is None else t[index])
        return _Points(pick(self.points), pick(self.gram))

    def inner(self, weights: torch.Tensor) -> torch.Tensor:
        """(U, K, M) weights -> (U, K, M): <sum_m weights[k, m] x_m, x_m'> for every point m'."""
        if self.gram is not None:
            return weights @ self.gram
        assert self.points is not None
        return (weights @ self.points) @ self.points.transpose(1, 2)

    def centroids(self, weights: torch.Tensor) -> torch.Tensor:
        """(U, K, M) weights -> (U, K, d) unit-norm weighted sums (all-zero rows stay zero)."""
        assert self.points is not None
        return F.normalize(weights @ self.points, dim=-1)


@dataclass
class _State:
    """A K-cluster solution for a set of units: centroids as weights over the points."""

    weights: torch.Tensor  # (U, K, M): a cluster's members (or a seed point)
    labels: torch.Tensor  # (U, M)
    closest: torch.Tensor  # (U, M) cosine of each point to its centroid

    @property
    def objective(self) -> torch.Tensor:
        return self.closest.mean(-1)

    def take(self, index: torch.Tensor) -> "_State":
        return _State(self.weights[index], self.labels[index], self.closest[index])


def _assign(points: _Points, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(closest cosine, label) of every point under the centroids `weights` define."""
    inner = points.inner(weights)  # (U, K, M)
    norms = (weights * inner).sum(-1, keepdim=True).clamp_min(_TINY).sqrt()  # |sum_k|, from the same product
    return (inner / norms).max(1)


def _lloyd(points: _Points, weights: torch.Tensor, n_iter: int) -> _State:
    """Lloyd iterations per unit until its labels stop changing; converged units leave the batch.

    The batch is compacted only when it halves, since copies cost too.
    """
    k = weights.shape[1]
    ks = torch.arange(k, device=weights.device)[None, :, None]
    closest, labels = _assign(points, weights)
    work: torch.Tensor | None = None  # indices of the units still iterating; None: all of them
    w_points, w_weights, w_labels = points, weights, labels
    for _ in range(n_iter):
        members = (w_labels[:, None, :] == ks).to(w_weights.dtype)  # (a, K, M)
        # an empty cluster keeps its previous centroid instead of collapsing to zero
        w_weights = torch.where(members.sum(-1, keepdim=True) == 0, w_weights, members)
        new_closest, new_labels = _assign(w_points, w_weights)
        # converged: no label moved, or the moves no longer raise the objective (float-noise
        # flips between near-identical points would otherwise go on for all n_iter)
        w_closest = closest if work is None else closest[work]
        gained = new_closest.mean(-1) - w_closest.mean(-1) > CONVERGED_GAIN
        changed = (new_labels != w_labels).any(-1) & gained
        if work is None:
            weights, labels, closest = w_weights, new_labels, new_closest
        else:
            weights[work], labels[work], closest[work] = w_weights, new_labels, new_closest
        w_labels = new_labels
        if not changed.any():
            break
        if changed.sum() * 2 <= changed.numel():
            work = torch.nonzero(changed).flatten() if work is None else work[changed]
            w_points, w_weights, w_labels = w_points.take(changed), w_weights[changed], w_labels[changed]
    return _State(weights, labels, closest)


def _add_centroid(points: _Points, state: _State, generator: torch.Generator) -> torch.Tensor:
    """Seeds for K+1 clusters: the K solution plus one point drawn by k-means++ (D^2) weighting.

    From K=1 the mean is a poor seed (it sits between the clusters), so K=2 is seeded by
    plain k-means++ (a random point, then a D^2 pick), as a fresh start would be.
    """
    units, _, count = state.weights.shape
    weights, closest = state.weights, state.closest
    if weights.shape[1] == 1:
        first = torch.randint(count, (units,), generator=generator, device=weights.device)
        weights = F.one_hot(first, count).to(weights.dtype)[:, None, :]
        closest = points.inner(weights)[:, 0]
    distance = (1.0 - closest).clamp_min(0.0) ** 2 + 1e-12
    pick = torch.multinomial(distance, 1, generator=generator).squeeze(-1)
    return torch.cat([weights, F.one_hot(pick, count).to(weights.dtype)[:, None, :]], dim=1)


def _first_state(points: _Points, units: int, count: int, device: torch.device) -> _State:
    """K=1: the centroid is the normalised mean, exactly (no iterations needed)."""
    weights = torch.ones(units, 1, count, device=device)
    closest, labels = _assign(points, weights)
    return _State(weights, labels, closest)


def _grow(points: _Points, state: _State, n_iter: int, n_init: int, generator: torch.Generator,
          settled: Callable[[_State], torch.Tensor] | None = None) -> _State:
    """Best (per unit) of `n_init` warm-started K+1 solutions.

    `settled(best)` marks units whose decision more draws cannot change (the best only gets
    better): they stop drawing, and the rest go on alone.
    """
    best: _State | None = None
    active: torch.Tensor | None = None  # units still drawing; None: all of them
    for _ in range(max(1, n_init)):
        here = points if active is None else points.take(active)
        start = state if active is None else state.take(active)
        result = _lloyd(here, _add_centroid(here, start, generator), n_iter)
        if best is None:
            best = result
        else:
            current = best if active is None else best.take(active)
            better = result.objective > current.objective
            merged = _State(
                torch.where(better[:, None, None], result.weights, current.weights),
                torch.where(better[:, None], result.labels, current.labels),
                torch.where(better[:, None], result.closest, current.closest),
            )
            if active is None:
                best = merged
            else:
                best.weights[active], best.labels[active], best.closest[active] = (
                    merged.weights, merged.labels, merged.closest)
        if settled is not None:
            open_units = torch.nonzero(~settled(best)).flatten()
            if open_units.numel() == 0:
                break
            active = open_units
    assert best is not None
    return best


def spherical_kmeans(
    points: torch.Tensor, k: int, n_iter: int = 30, n_init: int = 3, seed: int = 0
) -> KMeansResult:
    """Cluster unit-norm `points` (U, M, d) into `k` groups per unit (warm-started from 1..k-1)."""
    if points.ndim != 3:
        raise ValueError(f"points must be (units, points, dim), got {tuple(points.shape)}")
    units, count, _ = points.shape
    cloud = _Points.of(F.normalize(points.float(), dim=-1))
    generator = torch.Generator(device=points.device).manual_seed(seed)
    state = _first_state(cloud, units, count, points.device)
    for _ in range(1, k):
        state = _grow(cloud, state, n_iter, n_init, generator)
    return KMeansResult(cloud.centroids(state.weights), state.labels, state.objective)


def _null_points(cloud: _Points, generator: torch.Generator) -> _Points:
    """A unimodal reference with the points' own mean and covariance.

    Each null point is the mean plus a random Gaussian combination of the centred points, so
    its covariance equals the sample covariance but it has no clusters. (Shuffling coordinates
    independently would also destroy correlations, and any elongated cloud would then beat it.)
    The null is linear in the points, `z = A x` with `A = R (I - J) + J` (`J` = averaging), so
    on the Gram route only its Gram matrix `A G A^T` is formed, then normalised.
    """
    reference = cloud.gram if cloud.gram is not None else cloud.points
    assert reference is not None
    units, count = reference.shape[:2]
    device = reference.device
    mixing = torch.randn(units, count, count, generator=generator, device=device) / count ** 0.5
    if cloud.gram is None:
        assert cloud.points is not None
        mean = cloud.points.mean(1, keepdim=True)
        return _Points(F.normalize(mean + mixing @ (cloud.points - mean), dim=-1), None)
    combine = mixing - mixing.mean(-1, keepdim=True) + 1.0 / count  # A, (U, M, M)
    gram = combine @ cloud.gram @ combine.transpose(1, 2)
    scale = gram.diagonal(dim1=1, dim2=2).clamp_min(_TINY).rsqrt()
    return _Points(None, gram * scale[:, :, None] * scale[:, None, :])


def _relative_gain(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    return (current - previous) / (1.0 - previous).clamp_min(1e-6)


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
    if rule not in K_RULES:
        raise ValueError(f"unknown K rule '{rule}' (use 'gap' or 'fixed')")
    points = F.normalize(points.float(), dim=-1)
    units, count, _ = points.shape
    device = points.device
    cloud = _Points.of(points)
    generator = torch.Generator(device=device).manual_seed(seed)
    null_generator = torch.Generator(device=device).manual_seed(seed + 1000)

    chosen = torch.ones(units, dtype=torch.long, device=device)
    weights = torch.zeros(units, k_max, count, device=device)
    gain = torch.zeros(units, k_max, device=device)
    null_gain = torch.zeros_like(gain)
    state = _first_state(cloud, units, count, device)
    weights[:, :1] = state.weights
    labels = state.labels.clone()
    open_units = torch.arange(units, device=device)  # units whose every K so far was accepted
    gap = rule == "gap"
    if gap:
        null = _null_points(cloud, null_generator)
        null_state = _first_state(null, units, count, device)
    min_size = max(1, int(round(min_cluster_frac * count)))
    for k in range(2, k_max + 1):
        if open_units.numel() == 0:
            break
        everyone = open_units.numel() == units  # no copy while every unit is still open
        grown = _grow(cloud if everyone else cloud.take(open_units), state, n_iter, n_init, generator)
        gain[open_units, k - 1] = _relative_gain(state.objective, grown.objective)
        if gap:
            data_gain = gain[open_units, k - 1]
            big_enough = F.one_hot(grown.labels, k).sum(1).min(-1).values >= min_size

            def rejected(null_best: _State) -> torch.Tensor:
                # the null's gain only rises with more draws, so a unit it already beats is rejected
                # for good; a unit with a too-small cluster is rejected whatever the null does
                beaten = data_gain - _relative_gain(null_state.objective, null_best.objective) < min_gain
                return beaten | ~big_enough

            null_grown = _grow(null if everyone else null.take(open_units), null_state, n_iter, n_init,
                               null_generator, settled=rejected)
            null_gain[open_units, k - 1] = _relative_gain(null_state.objective, null_grown.objective)
            accepted = ~rejected(null_grown)
        else:
            accepted = torch.ones(open_units.numel(), dtype=torch.bool, device=device)
        keep = torch.nonzero(accepted).flatten()
        open_units = open_units[keep]
        state = grown.take(keep)
        chosen[open_units] = k
        weights[open_units, :k] = state.weights
        labels[open_units] = state.labels
        if gap:
            null_state = null_grown.take(keep)

    valid = torch.arange(k_max, device=device)[None, :] < chosen[:, None]
    centroids = torch.where(valid[..., None], cloud.centroids(weights), torch.zeros((), device=device))
    return KSelection(chosen, centroids, labels, gain, null_gain)
