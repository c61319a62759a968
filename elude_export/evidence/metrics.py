"""The interpretability metrics of a column's top-n images, and their confidence intervals.

Pure functions on arrays (no model, no data source), tested on constructed cases with known
answers: what evaluation means by "purer" or "more coherent" is decided here and only here.
"""

from __future__ import annotations

import numpy as np

# per-column metrics; the CONCEPT_METRICS exist where the data has ground-truth concepts. Concept
# purity is the pair (shape, colour); the factor purities score each factor alone, so that an
# early-layer column that is purely "red" (any shape) is not counted as impure, and
# `factor_purity` is the better of the two: pure in *some* factor.
METRICS = ("label_purity", "concept_purity", "shape_purity", "colour_purity", "factor_purity", "coherence",
           "label_entropy", "concept_entropy")
CONCEPT_METRICS = ("concept_purity", "shape_purity", "colour_purity", "factor_purity", "concept_entropy")
# per-column flags and gaps that only make sense with concepts
CONCEPT_EXTRAS = ("class_minus_concept", "same_class_mix")


def purity_entropy(categories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(columns, n) category ids -> (purity = majority share, entropy in bits) per column."""
    categories = np.asarray(categories, dtype=np.int64)
    if categories.ndim != 2 or categories.shape[1] == 0:
        raise ValueError(f"categories must be (columns, n) with n > 0, got {categories.shape}")
    n_categories = int(categories.max()) + 1 if categories.size else 1
    counts = np.zeros((categories.shape[0], n_categories), dtype=np.float64)
    np.add.at(counts, (np.arange(categories.shape[0])[:, None], categories), 1.0)
    share = counts / categories.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(share > 0, share * np.log2(share), 0.0).sum(1)
    return share.max(1), entropy + 0.0  # + 0.0 turns -0.0 into 0.0


def weighted_coherence(embeddings: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(columns, n, D) embeddings, (columns, n) weights -> activation-weighted mean pairwise cosine.

    `sum_{a != b} w_a w_b cos(e_a, e_b) / sum_{a != b} w_a w_b`: an MS-score-style coherence
    where strongly activating images count more. Non-positive weights count as zero.
    """
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)
    w = np.clip(weights, 0.0, None)
    gram = unit @ unit.transpose(0, 2, 1)  # (C, n, n)
    pair = w[:, :, None] * w[:, None, :]
    diagonal = np.einsum("cii->ci", pair)
    num = (gram * pair).sum((1, 2)) - np.einsum("cii->ci", gram * pair).sum(1)
    den = pair.sum((1, 2)) - diagonal.sum(1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def same_class_concept_mix(classes: np.ndarray, concepts: np.ndarray, min_images: int) -> np.ndarray:
    """Whether each top-n holds >= 2 concepts of its majority class with >= `min_images` images each.

    Flags columns that look pure by label but still mix unrelated concepts of one class.
    """
    majority = np.array([np.bincount(row).argmax() for row in classes])
    mixed = np.zeros(len(classes), dtype=bool)
    for column, (row_classes, row_concepts) in enumerate(zip(classes, concepts)):
        picked = row_concepts[row_classes == majority[column]]
        mixed[column] = int((np.bincount(picked) >= min_images).sum()) >= 2
    return mixed


def bootstrap_means(values: np.ndarray, groups: np.ndarray, resamples: np.ndarray) -> np.ndarray:
    """Means over the groups drawn in each row of `resamples` (B, G); NaN values are excluded."""
    n_groups = resamples.shape[1]
    ok = ~np.isnan(values)
    sums = np.bincount(groups[ok], weights=values[ok], minlength=n_groups)
    counts = np.bincount(groups[ok], minlength=n_groups).astype(np.float64)
    picked_counts = counts[resamples].sum(1)
    return sums[resamples].sum(1) / np.where(picked_counts > 0, picked_counts, np.nan)


def mean_ci(values: np.ndarray, groups: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0,
            level: float = 0.95) -> dict[str, float | int | None]:
    """Mean, median and a percentile bootstrap CI of the mean, resampling `groups` (default: items)."""
    values = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(values)
    if not ok.any():
        return {"mean": None, "median": None, "ci": [None, None], "n": 0}
    groups = np.arange(len(values)) if groups is None else np.asarray(groups)
    _, groups = np.unique(groups, return_inverse=True)
    resamples = np.random.default_rng(seed).integers(0, groups.max() + 1, size=(n_boot, groups.max() + 1))
    boot = bootstrap_means(values, groups, resamples)
    low, high = np.nanquantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean": float(values[ok].mean()), "median": float(np.median(values[ok])),
            "ci": [float(low), float(high)], "n": int(ok.sum())}


def paired_delta_ci(values_a: np.ndarray, groups_a: np.ndarray, values_b: np.ndarray, groups_b: np.ndarray,
                    n_groups: int, paired: bool, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict[str, float | None]:
    """mean(a) - mean(b) with a bootstrap CI; `paired` resamples the same units for both."""
    a_ok, b_ok = ~np.isnan(values_a), ~np.isnan(values_b)
    if not a_ok.any() or not b_ok.any():
        return {"delta": None, "ci": [None, None]}
    rng = np.random.default_rng(seed)
    draw_a = rng.integers(0, n_groups, size=(n_boot, n_groups))
    if paired:
        draw_b = draw_a
    else:
        n_b = int(groups_b.max()) + 1
        draw_b = rng.integers(0, n_b, size=(n_boot, n_b))
    boot = bootstrap_means(values_a, groups_a, draw_a) - bootstrap_means(values_b, groups_b, draw_b)
    low, high = np.nanquantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"delta": float(values_a[a_ok].mean() - values_b[b_ok].mean()), "ci": [float(low), float(high)]}
