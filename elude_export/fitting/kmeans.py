"""Batched spherical k-means and the choice of K per unit.

All units of a layer are clustered at once as one batched tensor computation, so fitting a
3072-unit layer is a handful of batched matmuls (GPU-capable), not a python loop.

Why it is cheap (METHOD.md, "Cost"): spherical k-means only needs the cosines between a
unit's M profiles, so each unit's `(M, d)` profiles are replaced by `(M, r)` coordinates with
the same inner products, `r = min(M, d)` (the Cholesky factor of the `(M, M)` Gram matrix when
d > M). Centroids are kept as member weights over the points (`centroid = normalize(members @
points)`), so the centroid in profile space is exact however the coordinates were made.
K grows by warm start: the K solution starts from the K-1 one plus one k-means++ pick (best of
`n_init` picks per unit); Lloyd stops per unit at convergence; a unit leaves the K loop at its
first rejected K, so its null is never clustered beyond that.

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

import torch
import torch.nn.functional as F

K_RULES = ("gap", "fixed")
# Added to the Gram diagonal so that rank-deficient profile sets (a unit's top images often share
# a low-dimensional context) still have a Cholesky factor: each point gains a self-similarity of
# 1e-5, below the float32 rounding of a d=768 cosine; centroids stay exact (see `_Basis.lift`).
GRAM_JITTER = 1e-5
CONVERGED_GAIN = 1e-6  # Lloyd stops for a unit whose mean cosine rose by less than this


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
    null_gain: torch.Tensor  # (U, k_max) the same on the null points


@dataclass
class _State:
    """A K-cluster solution for a set of units, in the units' coordinates."""

    centroids: torch.Tensor  # (U, K, r), unit norm
    labels: torch.Tensor  # (U, M)
    closest: torch.Tensor  # (U, M) cosine of each point to its centroid

    @property
    def objective(self) -> torch.Tensor:
        return self.closest.mean(-1)

    def take(self, index: torch.Tensor) -> "_State":
        return _State(self.centroids[index], self.labels[index], self.closest[index])


class _Basis:
    """Per-unit coordinates with the points' inner products, and the exact way back to profile space."""

    def __init__(self, points: torch.Tensor):
        self.points = points
        _, count, dim = points.shape
        self.bad = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
        if dim <= count:
            self.coords = points
            return
        gram = points @ points.transpose(1, 2)
        gram.diagonal(dim1=1, dim2=2).add_(GRAM_JITTER)
        coords, info = torch.linalg.cholesky_ex(gram)
        self.bad = (info != 0) | ~torch.isfinite(coords).flatten(1).all(-1)
        if self.bad.any():  # Cholesky failed even with the jitter: QR is exact and slower
            coords[self.bad] = torch.linalg.qr(points[self.bad].transpose(1, 2), mode="r").R.transpose(1, 2)
        self.coords = coords

    def lift(self, centroids: torch.Tensor) -> torch.Tensor:
        """(U, K, r) coordinate centroids -> (U, K, d) unit-norm profile-space centroids.

        A centroid is a normalised sum of member coordinates, c = coords^T s / |.|; solving
        coords^T alpha = c gives alpha = s / |.| (triangular for Cholesky, least squares for the
        QR fallback), so points^T alpha is the normalised sum of the members' profiles: exact.
        """
        if self.coords is self.points:
            return centroids
        target = centroids.transpose(1, 2)  # (U, r, K)
        alpha = torch.linalg.solve_triangular(self.coords.transpose(1, 2), target, upper=True)
        if self.bad.any():
            alpha[self.bad] = torch.linalg.lstsq(self.coords[self.bad].transpose(1, 2), target[self.bad]).solution
        return F.normalize(alpha.transpose(1, 2) @ self.points, dim=-1)


def unit_coordinates(points: torch.Tensor) -> torch.Tensor:
    """(U, M, r) rows with the same pairwise inner products as `points` (U, M, d), r = min(M, d)."""
    return _Basis(points).coords


def _lloyd(coords: torch.Tensor, centroids: torch.Tensor, n_iter: int) -> _State:
    """Lloyd iterations per unit until its labels stop changing; converged units leave the batch.

    Cluster sums are one batched matmul with the (K, M) membership matrix (scatter-add is
    several times slower on CPU); the batch is compacted only when it halves, since copies cost too.
    """
    k = centroids.shape[1]
    ks = torch.arange(k, device=coords.device)[None, :, None]
    closest, labels = (coords @ centroids.transpose(1, 2)).max(-1)
    work: torch.Tensor | None = None  # indices of the units still iterating; None: all of them
    w_coords, w_centroids, w_labels = coords, centroids, labels
    for _ in range(n_iter):
        onehot = (w_labels[:, None, :] == ks).to(coords.dtype)  # (a, K, M)
        # an empty cluster keeps its previous centroid instead of collapsing to zero
        empty = (onehot.sum(-1) == 0)[..., None]
        w_centroids = torch.where(empty, w_centroids, F.normalize(onehot @ w_coords, dim=-1))
        new_closest, new_labels = (w_coords @ w_centroids.transpose(1, 2)).max(-1)
        # converged: no label moved, or the moves no longer raise the objective (float-noise
        # flips between near-identical points would otherwise go on for all n_iter)
        w_closest = closest if work is None else closest[work]
        gained = new_closest.mean(-1) - w_closest.mean(-1) > CONVERGED_GAIN
        changed = (new_labels != w_labels).any(-1) & gained
        if work is None:
            centroids, labels, closest = w_centroids, new_labels, new_closest
        else:
            centroids[work], labels[work], closest[work] = w_centroids, new_labels, new_closest
        w_labels = new_labels
        if not changed.any():
            break
        if changed.sum() * 2 <= changed.numel():
            work = torch.nonzero(changed).flatten() if work is None else work[changed]
            w_coords, w_centroids, w_labels = w_coords[changed], w_centroids[changed], w_labels[changed]
    return _State(centroids, labels, closest)


def _add_centroid(coords: torch.Tensor, state: _State, generator: torch.Generator) -> torch.Tensor:
    """Seeds for K+1 clusters: the K solution plus one point drawn by k-means++ (D^2) weighting.

    From K=1 the mean is a poor seed (it sits between the clusters), so K=2 is seeded by
    plain k-means++ (a random point, then a D^2 pick), as a fresh start would be.
    """
    units, count, _ = coords.shape
    batch = torch.arange(units, device=coords.device)
    centroids, closest = state.centroids, state.closest
    if centroids.shape[1] == 1:
        first = torch.randint(count, (units,), generator=generator, device=coords.device)
        centroids = coords[batch, first][:, None, :]
        closest = (coords @ centroids.transpose(1, 2)).squeeze(-1)
    distance = (1.0 - closest).clamp_min(0.0) ** 2 + 1e-12
    pick = torch.multinomial(distance, 1, generator=generator).squeeze(-1)
    return torch.cat([centroids, coords[batch, pick][:, None, :]], dim=1)


def _first_state(coords: torch.Tensor) -> _State:
    """K=1: the centroid is the normalised mean, exactly (no iterations needed)."""
    centroids = F.normalize(coords.mean(1, keepdim=True), dim=-1)
    closest, labels = (coords @ centroids.transpose(1, 2)).max(-1)
    return _State(centroids, labels, closest)


def _grow(coords: torch.Tensor, state: _State, n_iter: int, n_init: int, generator: torch.Generator) -> _State:
    """Best (per unit) of `n_init` warm-started K+1 solutions."""
    best: _State | None = None
    for _ in range(max(1, n_init)):
        result = _lloyd(coords, _add_centroid(coords, state, generator), n_iter)
        if best is None:
            best = result
            continue
        better = result.objective > best.objective
        best = _State(
            torch.where(better[:, None, None], result.centroids, best.centroids),
            torch.where(better[:, None], result.labels, best.labels),
            torch.where(better[:, None], result.closest, best.closest),
        )
    assert best is not None
    return best


def spherical_kmeans(
    points: torch.Tensor, k: int, n_iter: int = 30, n_init: int = 3, seed: int = 0
) -> KMeansResult:
    """Cluster unit-norm `points` (U, M, d) into `k` groups per unit (warm-started from 1..k-1)."""
    if points.ndim != 3:
        raise ValueError(f"points must be (units, points, dim), got {tuple(points.shape)}")
    basis = _Basis(F.normalize(points.float(), dim=-1))
    generator = torch.Generator(device=points.device).manual_seed(seed)
    state = _first_state(basis.coords)
    for _ in range(1, k):
        state = _grow(basis.coords, state, n_iter, n_init, generator)
    return KMeansResult(basis.lift(state.centroids), state.labels, state.objective)


def _null_points(points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A unimodal reference with the points' own mean and covariance.

    Each null point is the mean plus a random Gaussian combination of the centred points, so
    its covariance equals the sample covariance but it has no clusters. (Shuffling coordinates
    independently would also destroy correlations, and any elongated cloud would then beat it.)
    Linear in the points, so it is built in the coordinates directly.
    """
    units, count, _ = points.shape
    mean = points.mean(1, keepdim=True)
    mixing = torch.randn(units, count, count, generator=generator, device=points.device) / count ** 0.5
    return F.normalize(mean + mixing @ (points - mean), dim=-1)


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
    basis = _Basis(points)
    coords = basis.coords
    generator = torch.Generator(device=device).manual_seed(seed)
    null_generator = torch.Generator(device=device).manual_seed(seed + 1000)

    chosen = torch.ones(units, dtype=torch.long, device=device)
    centroids = torch.zeros(units, k_max, coords.shape[2], device=device)
    gain = torch.zeros(units, k_max, device=device)
    null_gain = torch.zeros_like(gain)
    state = _first_state(coords)
    centroids[:, :1] = state.centroids
    labels = state.labels.clone()
    open_units = torch.arange(units, device=device)  # units whose every K so far was accepted
    gap = rule == "gap"
    if gap:
        null_coords = _null_points(coords, null_generator)
        null_state = _first_state(null_coords)
    min_size = max(1, int(round(min_cluster_frac * count)))
    for k in range(2, k_max + 1):
        if open_units.numel() == 0:
            break
        grown = _grow(coords[open_units], state, n_iter, n_init, generator)
        gain[open_units, k - 1] = _relative_gain(state.objective, grown.objective)
        if gap:
            null_grown = _grow(null_coords[open_units], null_state, n_iter, n_init, null_generator)
            null_gain[open_units, k - 1] = _relative_gain(null_state.objective, null_grown.objective)
            sizes = F.one_hot(grown.labels, k).sum(1)
            accepted = (gain[open_units, k - 1] - null_gain[open_units, k - 1] >= min_gain) & (
                sizes.min(-1).values >= min_size)
        else:
            accepted = torch.ones(open_units.numel(), dtype=torch.bool, device=device)
        keep = torch.nonzero(accepted).flatten()
        open_units = open_units[keep]
        state = grown.take(keep)
        chosen[open_units] = k
        centroids[open_units, :k] = state.centroids
        labels[open_units] = state.labels
        if gap:
            null_state = null_grown.take(keep)

    valid = torch.arange(k_max, device=device)[None, :] < chosen[:, None]
    lifted = torch.where(valid[..., None], basis.lift(centroids), torch.zeros((), device=device))
    return KSelection(chosen, lifted, labels, gain, null_gain)
