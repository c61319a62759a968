"""What an evaluation returns, and its two renderings: JSON (every number) and a plain-text table.

Both read the baselines' flags from the result (`EvalResult.baselines`) instead of naming
methods, so a newly registered family shows up in them without edits here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elude_export.artifacts import check_output_path, write_json_atomic
from elude_export.errors import DataError
from elude_export.evidence.baselines.base import ELUDE, UNITS, Baseline, delta_key


@dataclass
class ColumnSet:
    """One family of columns of one layer and what their top-n images are."""

    method: str
    values: np.ndarray  # (n, C) descending
    images: np.ndarray  # (n, C)
    active: np.ndarray  # (C,) images with positive activation
    parent: np.ndarray  # (C,) parent unit (unpaired families: the column itself)
    split: np.ndarray  # (C,) parent unit has K > 1 (unpaired families: True)
    names: list[str]
    metrics: dict[str, np.ndarray] = field(default_factory=dict)  # per column, NaN where unscored

    @property
    def n_columns(self) -> int:
        return int(self.values.shape[1])

    def scored(self, top_n: int) -> np.ndarray:
        return self.active >= top_n


@dataclass
class LayerEvaluation:
    path: str
    n_units: int
    k_counts: dict[int, int]
    columns: dict[str, ColumnSet]
    summary: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)  # baselines' per-layer records by `info_key` ("sae")
    route_balance: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    data: str
    n_images: int
    top_n: int
    model: str
    router: str
    embedding: str
    accuracy: dict[str, Any]
    layers: list[LayerEvaluation]
    config: dict[str, Any]
    baselines: dict[str, type[Baseline]]  # the families that made the columns, in report order

    def to_json(self) -> dict[str, Any]:
        return {
            "data": self.data, "n_images": self.n_images, "top_n": self.top_n, "model": self.model,
            "router": self.router, "embedding": self.embedding, "accuracy": self.accuracy, "config": self.config,
            "unscored_rule": f"columns with fewer than top_n={self.top_n} images of positive activation are "
                             "excluded from every metric and counted in 'unscored'",
            "layers": [{"path": l.path, "n_units": l.n_units, "k_counts": {str(k): v for k, v in l.k_counts.items()},
                        **l.info, "route_balance": l.route_balance, "summary": l.summary} for l in self.layers],
        }

    def table(self, split_only: bool = False) -> str:
        return format_table(self, split_only)

    def controls(self) -> list[str]:
        """The families compared with ELUDe, in report order."""
        return [name for name, kind in self.baselines.items() if kind.is_control]


def write_json(result: EvalResult, path: str | Path) -> Path:
    """Every summary number as strict JSON (NaN as null), written atomically."""
    path = Path(path)
    check_output_path(path, DataError, "eval.json")
    return write_json_atomic(path, result.to_json(), DataError)


def _fmt(stat: dict[str, Any] | None, signed: bool = False) -> str:
    if not stat or stat.get("mean", stat.get("delta")) is None:
        return "-"
    value = stat.get("mean", stat.get("delta"))
    low, high = stat["ci"]
    form = "{:+.3f}" if signed else "{:.3f}"
    return f"{form.format(value)} [{form.format(low)},{form.format(high)}]"


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def format_table(result: EvalResult, split_only: bool = False) -> str:
    """The evaluation as one plain-text table per layer (means [95% CI]; medians in the JSON)."""
    acc = result.accuracy
    lines = [
        f"data {result.data}: {result.n_images} images, top-{result.top_n} per column, model {result.model}, "
        f"router {result.router}, coherence in {result.embedding} space",
        f"accuracy: original {acc['original']:.4f}" + "".join(kind.accuracy_text(acc)
                                                             for kind in result.baselines.values()),
        f"unscored = columns with fewer than {result.top_n} images of positive activation (excluded from means)",
    ]
    has_concepts = any("concept_purity" in row for layer in result.layers for row in layer.summary)
    for layer in result.layers:
        lines.append("")
        lines.extend(_layer_heading(result, layer))
        lines.append(_header(has_concepts))
        for row in layer.summary:
            if not split_only or row["scope"] == "split":
                lines.extend(_row_lines(result, row, has_concepts))
    lines.append("")
    controls = result.controls()
    if controls:
        lines.append("controls (same K_j): " + "; ".join(f"{name} = {result.baselines[name].description}"
                                                         for name in controls))
    if has_concepts:
        lines.append("cls-cpt: mean (class purity - concept purity) of the top-n; mix: share of columns whose top-n "
                     "holds >= 2 concepts of its majority class; shape / colour: purity of one factor alone; "
                     "factor: the better of the two")
    return "\n".join(lines)


def _layer_heading(result: EvalResult, layer: LayerEvaluation) -> list[str]:
    k_text = " ".join(f"K{k}:{n}" for k, n in sorted(layer.k_counts.items()))
    balance = " ".join(f"{name} {value:.2f}" for name, value in layer.route_balance.items())
    lines = [f"{layer.path}: {layer.n_units} units ({k_text}); route balance {balance} (1 = even)"]
    for kind in result.baselines.values():
        if kind.info_key is not None:
            lines.extend(kind.layer_lines(layer.info.get(kind.info_key), result.accuracy))
    return lines


def _header(has_concepts: bool) -> str:
    header = f"  {'method':<8}{'scope':<6}{'cols':>6}{'unsc':>6}  {'label purity':<22}{'Δ vs units':<25}"
    if has_concepts:
        header += f"{'concept purity':<22}{'Δ vs units':<25}"
    header += f"{'coherence':<22}{'entropy':>8}"
    if has_concepts:
        header += f"{'cls-cpt':>8}{'mix':>6}{'shape':>7}{'colour':>7}{'factor':>7}"
    return header


def _row_lines(result: EvalResult, row: dict[str, Any], has_concepts: bool) -> list[str]:
    """A summary row, and under ELUDe's rows its differences to each control."""
    delta = row.get(delta_key(UNITS), {})
    line = (f"  {row['method']:<8}{row['scope']:<6}{row['columns']:>6}{row['unscored']:>6}  "
            f"{_fmt(row['label_purity']):<22}{_fmt(delta.get('label_purity'), True):<25}")
    if has_concepts:
        line += f"{_fmt(row['concept_purity']):<22}{_fmt(delta.get('concept_purity'), True):<25}"
    line += f"{_fmt(row['coherence']):<22}{_number(row['label_entropy']['mean'], '.2f'):>8}"
    if has_concepts:
        line += (f"{_number(row['class_minus_concept']['mean'], '.3f'):>8}"
                 f"{_number(row['same_class_mix']['mean'], '.2f'):>6}"
                 + "".join(f"{_number(row[m]['mean'], '.3f'):>7}"
                           for m in ("shape_purity", "colour_purity", "factor_purity")))
    lines = [line]
    for control in result.controls() if row["method"] == ELUDE else ():
        vs = row.get(delta_key(control))
        if vs is None:
            continue
        text = f"  {'':<14}{'':>12}  {f'{ELUDE} - {control}:':<22}{_fmt(vs.get('label_purity'), True):<25}"
        if has_concepts:
            text += f"{'':<22}{_fmt(vs.get('concept_purity'), True):<25}"
        lines.append(text)
    return lines
