"""From each family's top-n images to per-column metrics and per-layer summary rows.

A column with fewer than top_n images of positive activation is *unscored*: its top-n would
be padded with images it does not fire on, so it is excluded from every mean and counted
instead. Means carry bootstrap intervals that resample parent *units* (a unit's sub-units move
together); differences to the units are paired by unit where the family has parent units,
and ELUDe's rows carry paired differences to every control.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from elude_export.data.concepts import concept_factors
from elude_export.data.sources import ImageSource
from elude_export.evidence.baselines.base import ELUDE, UNITS, Baseline, Columns, delta_key
from elude_export.evidence.collect import Collected, RunningTopN
from elude_export.evidence.metrics import (
    CONCEPT_EXTRAS, CONCEPT_METRICS, METRICS, mean_ci, paired_delta_ci, purity_entropy, same_class_concept_mix, weighted_coherence,
)
from elude_export.evidence.results import ColumnSet, LayerEvaluation
from elude_export.plan import LayerPlan

if TYPE_CHECKING:
    from elude_export.evidence.evaluate import EvalConfig

SCOPES = ("all", "split")  # every column, or only those of split units


def evaluate_layer(layer: LayerPlan, baselines: Mapping[str, Baseline], collected: Collected, source: ImageSource,
                   config: EvalConfig) -> LayerEvaluation:
    """Score every family's columns of one layer and summarise them."""
    kinds = {name: type(baseline) for name, baseline in baselines.items()}
    columns = {}
    for name, baseline in baselines.items():
        top = collected.tops[name].get(layer.path)
        if top is not None:  # a family may cover only some layers (a switched-off SAE: none)
            columns[name] = column_set(name, top, baseline.columns(layer))
            score_columns(columns[name], source, collected.embeddings, config)
    info = {kind.info_key: baselines[name].layer_info(layer.path, collected.n_images)
            for name, kind in kinds.items() if kind.info_key is not None}
    balance = {name: route_balance(column, layer) for name, column in columns.items() if kinds[name].splits_units}
    k_counts = {int(k): int(c) for k, c in zip(*np.unique(layer.k.numpy(), return_counts=True))}
    return LayerEvaluation(layer.path, layer.n_units, k_counts, columns,
                           summarise_layer(columns, kinds, layer, config, source.concepts is not None), info, balance)


def column_set(name: str, top: RunningTopN, columns: Columns) -> ColumnSet:
    assert top.values is not None and top.images is not None and top.active is not None
    return ColumnSet(name, top.values.numpy(), top.images.numpy(), top.active.numpy(), columns.parent, columns.split,
                     columns.names)


def score_columns(columns: ColumnSet, source: ImageSource, embeddings: np.ndarray, config: EvalConfig) -> None:
    """Fill per-column metrics; unscored columns (fewer than top_n active images) get NaN."""
    n = config.top_n
    scored = columns.scored(n)
    metrics = {name: np.full(columns.n_columns, np.nan) for name in (*METRICS, *CONCEPT_EXTRAS)}
    if scored.any() and columns.values.shape[0] >= n:
        images = columns.images[:n, scored].T  # (scored, n)
        assert source.labels is not None
        purity, entropy = purity_entropy(source.labels[images])
        metrics["label_purity"][scored], metrics["label_entropy"][scored] = purity, entropy
        if source.concepts is not None:
            c_purity, c_entropy = purity_entropy(source.concepts[images])
            metrics["concept_purity"][scored], metrics["concept_entropy"][scored] = c_purity, c_entropy
            factors = concept_factors(source.concepts[images])
            metrics["shape_purity"][scored] = purity_entropy(factors["shape"])[0]
            metrics["colour_purity"][scored] = purity_entropy(factors["colour"])[0]
            metrics["factor_purity"][scored] = np.maximum(metrics["shape_purity"][scored],
                                                          metrics["colour_purity"][scored])
            metrics["class_minus_concept"][scored] = purity - c_purity
            min_images = config.mix_min_images or max(2, int(round(0.15 * n)))
            metrics["same_class_mix"][scored] = same_class_concept_mix(
                source.labels[images], source.concepts[images], min_images).astype(float)
        weights = columns.values[:n, scored].T
        coherence = np.empty(len(images))
        for start in range(0, len(images), 512):  # bounds the (chunk, n, D) gather
            chunk = slice(start, start + 512)
            coherence[chunk] = weighted_coherence(embeddings[images[chunk]], weights[chunk])
        metrics["coherence"][scored] = coherence
    columns.metrics = metrics


def route_balance(columns: ColumnSet, layer: LayerPlan) -> float:
    """Mean normalised entropy of how split units' active images divide among their sub-units (1 = even)."""
    values = []
    for unit in layer.split_units.tolist():
        shares = columns.active[columns.parent == unit].astype(np.float64)
        if shares.sum() <= 0 or len(shares) < 2:
            continue
        p = shares / shares.sum()
        values.append(float(-(p[p > 0] * np.log(p[p > 0])).sum() / math.log(len(shares))))
    return float(np.mean(values)) if values else float("nan")


def summarise_layer(columns: dict[str, ColumnSet], kinds: Mapping[str, type[Baseline]], layer: LayerPlan,
                    config: EvalConfig, has_concepts: bool) -> list[dict[str, Any]]:
    """One record per (family, scope): counts, metric means with CIs, deltas vs units and controls."""
    rows = []
    metric_names = [m for m in METRICS if has_concepts or m not in CONCEPT_METRICS]
    extra = list(CONCEPT_EXTRAS) if has_concepts else []
    controls = [name for name in columns if kinds[name].is_control]
    for scope in SCOPES:
        for method, column_set in columns.items():
            kind = kinds[method]
            if scope == "split" and not kind.has_split_scope:
                continue
            keep = _in_scope(column_set, scope)
            scored = column_set.scored(config.top_n) & keep
            row: dict[str, Any] = {"method": method, "scope": scope, "columns": int(keep.sum()),
                                   "scored": int(scored.sum()), "unscored": int((keep & ~scored).sum())}
            for metric in metric_names + extra:
                values = np.where(keep, column_set.metrics[metric], np.nan)[keep]
                row[metric] = mean_ci(values, column_set.parent[keep], config.bootstrap, config.seed)
            if method != UNITS:
                row[delta_key(UNITS)] = _deltas(column_set, columns[UNITS], keep, _in_scope(columns[UNITS], scope),
                                                metric_names, config, kind.paired_with_units, layer.n_units)
            if method == ELUDE:
                for control in controls:
                    row[delta_key(control)] = _deltas(column_set, columns[control], keep, keep, metric_names, config,
                                                      True, layer.n_units)
            rows.append(row)
    return rows


def _in_scope(columns: ColumnSet, scope: str) -> np.ndarray:
    return columns.split if scope == "split" else np.ones(columns.n_columns, dtype=bool)


def _deltas(columns: ColumnSet, reference: ColumnSet, keep: np.ndarray, reference_keep: np.ndarray,
            metrics: list[str], config: EvalConfig, paired: bool, n_units: int) -> dict[str, Any]:
    """Per metric, mean(columns) - mean(reference) over the kept columns, with a bootstrap CI."""
    out = {}
    for metric in metrics:
        a = np.where(keep, columns.metrics[metric], np.nan)
        b = np.where(reference_keep, reference.metrics[metric], np.nan)
        n_groups = n_units if paired else columns.n_columns
        out[metric] = paired_delta_ci(a, columns.parent, b, reference.parent, n_groups, paired, config.bootstrap,
                                      config.seed)
    return out
