"""Concept-selective steering, measured: ablate what is labelled "red circle" and see what breaks.

For each ground-truth concept, the columns whose label (on a labelled set, `labels.py`) is that
concept are ablated together, and the change of the true class's probability is measured on
held-out images of that concept against images of every other concept:

    selectivity = drop on the target concept / mean drop on the other concepts

for three handles: ELUDe sub-units (steer 0 on the selected sub-units), their parent units
(steer 0 on every sub-unit of those units: neuron ablation) and the TopK-SAE latents with the
same label. The SAE ablation subtracts only the selected latents' decoder contributions from
`h` (`h - W_dec[:, S] z_S`), so the SAE's reconstruction error never enters the comparison:
the rest of the model runs exactly as the original. Drops below `FLOOR` in the denominator are
clipped to it (a ratio of noise is not a measurement); the drops themselves are reported too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from elude_export.data.sources import ImageSource
from elude_export.errors import DataError
from elude_export.evidence.baselines.sae_model import SAEConfig, TopKSAE, train_layer_saes
from elude_export.evidence.collect import RunningTopN
from elude_export.evidence.labels import label_columns
from elude_export.export.contract import SubunitLabel
from elude_export.layers import find_layers
from elude_export.models import LoadedModel, model_batches
from elude_export.plan import Plan
from elude_export.rewrite import apply_plan, reset_steers, set_steers
from elude_export.vocabulary import parse_subunit_name

FLOOR = 1e-3  # smallest mean probability drop on the other concepts a ratio is divided by
METHODS = ("sub-units", "units", "sae")


@dataclass
class Ablation:
    """One handle's ablation for one concept."""

    concept: str
    method: str
    columns: int  # sub-units, units or latents ablated
    target_drop: float | None = None  # mean drop of p(true class) on the concept's images
    other_drop: float | None = None  # mean over the other concepts of their mean drop
    selectivity: float | None = None
    target_accuracy: tuple[float, float] | None = None  # before, after
    other_accuracy: tuple[float, float] | None = None


@dataclass
class SelectivityResult:
    layers: list[str]
    label_data: str
    eval_data: str
    min_share: float
    rows: list[Ablation] = field(default_factory=list)

    def median(self, method: str) -> float | None:
        values = [r.selectivity for r in self.rows if r.method == method and r.selectivity is not None]
        return float(np.median(values)) if values else None

    def to_json(self) -> dict[str, Any]:
        return {"layers": self.layers, "label_data": self.label_data, "eval_data": self.eval_data,
                "min_share": self.min_share, "floor": FLOOR, "rows": [asdict(r) for r in self.rows],
                "median_selectivity": {m: self.median(m) for m in METHODS}}

    def methods(self) -> list[str]:
        return [m for m in METHODS if any(r.method == m for r in self.rows)]

    def table(self) -> str:
        methods = self.methods()
        lines = [f"concept ablation in {', '.join(self.layers)}: columns labelled with the concept on "
                 f"{self.label_data} (share >= {self.min_share:g}), measured on {self.eval_data}",
                 "drop = mean decrease of p(true class); sel = target drop / mean drop on the 15 other concepts "
                 f"(denominator floored at {FLOOR:g}); acc = target-concept accuracy before -> after", "",
                 "| concept | " + " | ".join(f"{m}: n / drop target / drop others / sel / acc" for m in methods) + " |",
                 "|---|" + "---|" * len(methods)]
        by_key = {(r.concept, r.method): r for r in self.rows}
        for concept in dict.fromkeys(r.concept for r in self.rows):
            cells = []
            for method in methods:
                r = by_key.get((concept, method))
                if r is None or r.target_drop is None:
                    cells.append(f"{0 if r is None else r.columns} / - / - / - / -")
                    continue
                assert r.target_accuracy is not None
                cells.append(f"{r.columns} / {r.target_drop:+.3f} / {r.other_drop:+.4f} / {r.selectivity:.1f} / "
                             f"{r.target_accuracy[0]:.2f}->{r.target_accuracy[1]:.2f}")
            lines.append(f"| {concept} | " + " | ".join(cells) + " |")
        medians = {m: self.median(m) for m in methods}
        lines.append("")
        lines.append("median selectivity: " + ", ".join(f"{m} {'-' if v is None else f'{v:.2f}'}"
                                                        for m, v in medians.items()))
        if medians.get("sub-units") and medians.get("units"):
            lines.append(f"sub-units / units: {medians['sub-units'] / medians['units']:.2f}x")
        for what in ("target_drop", "other_drop"):
            lines.append(f"median {what.replace('_', ' ')}: " + ", ".join(
                f"{m} {np.median([getattr(r, what) for r in self.rows if r.method == m and r.columns]):+.4f}"
                for m in methods if any(r.method == m and r.columns for r in self.rows)))
        return "\n".join(lines)


def pick_by_label(labels: Mapping[str, SubunitLabel], concept: str, min_share: float) -> list[str]:
    """Names whose label's dominant concept is `concept` with at least `min_share` of the top-n."""
    return sorted(name for name, label in labels.items()
                  if label.dominant == concept and (label.share or 0.0) >= min_share)


@torch.no_grad()
def sae_latent_labels(loaded: LoadedModel, saes: Mapping[str, TopKSAE], source: ImageSource, top_n: int,
                      batch_size: int, device: torch.device) -> dict[str, SubunitLabel]:
    """Labels of SAE latents (`<layer>/sae0001`) by their top-n images, as for sub-units."""
    model = loaded.model.eval().to(device)
    layers = {layer.path: layer for layer in find_layers(model, list(saes))}
    tops = {path: RunningTopN(top_n) for path in saes}
    seen: dict[str, torch.Tensor] = {}
    handles = [layers[path].consumer.register_forward_pre_hook(
        lambda _m, args, path=path: seen.__setitem__(path, args[0])) for path in saes]
    dtype = next(model.parameters()).dtype
    try:
        for indices, batch in model_batches(source, loaded.input_spec, batch_size, device, dtype):
            model(batch)
            for path, sae in saes.items():
                h = seen[path]
                z = sae.encode(h.float().reshape(-1, h.shape[-1])).reshape(h.shape[0], -1, sae.n_latents)
                tops[path].update(z.amax(1), torch.as_tensor(indices))
    finally:
        for handle in handles:
            handle.remove()
    labels: dict[str, SubunitLabel] = {}
    for path, top in tops.items():
        assert top.images is not None and top.active is not None
        names = [f"{path}/sae{i:04d}" for i in range(saes[path].n_latents)]
        labels.update(label_columns(names, top.images.numpy(), top.active.numpy(), source, top_n))
    return labels


def _true_probability(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = logits.float().softmax(-1)
    return p.gather(1, labels[:, None])[:, 0].cpu(), (logits.argmax(-1) == labels).cpu()


def _summarise(concept: str, method: str, columns: int, before: tuple[torch.Tensor, torch.Tensor],
               after: tuple[torch.Tensor, torch.Tensor], concepts: np.ndarray, target: int) -> Ablation:
    drop = (before[0] - after[0]).numpy()
    others = [drop[concepts == c].mean() for c in np.unique(concepts) if c != target]
    row = Ablation(concept, method, columns)
    in_target = concepts == target
    row.target_drop = float(drop[in_target].mean())
    row.other_drop = float(np.mean(others))
    row.selectivity = row.target_drop / max(row.other_drop, FLOOR)
    row.target_accuracy = (float(before[1].numpy()[in_target].mean()), float(after[1].numpy()[in_target].mean()))
    row.other_accuracy = (float(before[1].numpy()[~in_target].mean()), float(after[1].numpy()[~in_target].mean()))
    return row


@torch.no_grad()
def concept_selectivity(loaded: LoadedModel, plan: Plan, subunit_labels: Mapping[str, SubunitLabel],
                        label_source: ImageSource, eval_source: ImageSource, layers: list[str],
                        min_share: float = 0.5, sae_config: SAEConfig | None = None, top_n: int = 20,
                        batch_size: int = 128, device: torch.device | str = "cpu",
                        log: Callable[[str], None] = lambda _m: None) -> SelectivityResult:
    """Ablate each concept's sub-units, their parent units and its SAE latents; measure on `eval_source`."""
    from elude_export.data.concepts import N_CONCEPTS, concept_name

    if eval_source.concepts is None or eval_source.labels is None:
        raise DataError(f"{eval_source.name} has no ground-truth concepts: use embedded:test")
    device = torch.device(device)
    model = loaded.model.eval().to(device)
    rewritten = apply_plan(model, plan, layers=layers, poolings=()).to(device)
    dtype = next(model.parameters()).dtype
    batches = [(torch.as_tensor(eval_source.labels[i], device=device), b)
               for i, b in model_batches(eval_source, loaded.input_spec, batch_size, device, dtype)]
    labels_all = torch.cat([y for y, _ in batches])

    def run(forward: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.cat([forward(b) for _, b in batches])
        return _true_probability(logits, labels_all)

    before = run(rewritten)
    saes: dict[str, TopKSAE] = {}
    if sae_config is not None:  # None: no SAE rows (their training is the slow part)
        log(f"training SAEs on {label_source.name} for {', '.join(layers)}")
        saes = train_layer_saes(model, find_layers(model, layers), {p: plan.layer(p).n_subunits for p in layers},
                                label_source, loaded.input_spec, sae_config, batch_size, device, log)
    sae_labels = sae_latent_labels(loaded, saes, label_source, top_n, batch_size, device) if saes else {}
    consumers = {layer.path: layer.consumer for layer in find_layers(model, layers)}
    wanted = set(layers)
    subunit_labels = {n: l for n, l in subunit_labels.items()
                      if n.rsplit("/", 1)[0] in wanted and "." in n.rsplit("/", 1)[1]}
    result = SelectivityResult(layers, label_source.name, eval_source.name, min_share)
    concepts = np.asarray(eval_source.concepts)
    for concept in range(N_CONCEPTS):
        name = concept_name(concept)
        picked = pick_by_label(subunit_labels, name, min_share)
        units = sorted({parse_subunit_name(n)[:2] for n in picked})
        whole = unit_subunit_names(plan, units)
        latents = pick_by_label(sae_labels, name, min_share)
        for method, steered, count in (("sub-units", picked, len(picked)), ("units", whole, len(units))):
            if not steered:
                result.rows.append(Ablation(name, method, 0))
                continue
            set_steers(rewritten, {n: 0.0 for n in steered})
            try:
                result.rows.append(_summarise(name, method, count, before, run(rewritten), concepts, concept))
            finally:
                reset_steers(rewritten)
        if saes and not latents:
            result.rows.append(Ablation(name, "sae", 0))
        elif latents:
            handles = [consumers[path].register_forward_pre_hook(_sae_ablation(saes[path], _latent_index(latents, path)))
                       for path in layers if _latent_index(latents, path)]
            try:
                result.rows.append(_summarise(name, "sae", len(latents), before, run(model), concepts, concept))
            finally:
                for handle in handles:
                    handle.remove()
        log(f"  {name}: {len(picked)} sub-units of {len(units)} units, {len(latents)} SAE latents")
    return result


def unit_subunit_names(plan: Plan, units: list[tuple[str, int]]) -> list[str]:
    """Every sub-unit name of the given (layer, unit) pairs: steering them all ablates the unit."""
    out = []
    for path, unit in units:
        layer = plan.layer(path)
        out += [name for name, parent in zip(layer.subunit_names(), layer.columns()[0].tolist()) if parent == unit]
    return out


def _latent_index(names: list[str], path: str) -> list[int]:
    return [int(n.rsplit("/sae", 1)[1]) for n in names if n.rsplit("/", 1)[0] == path]


def _sae_ablation(sae: TopKSAE, latents: list[int]) -> Callable:
    """Consumer pre-hook: h minus the chosen latents' decoder contributions (the rest of h untouched)."""
    index = torch.as_tensor(latents, dtype=torch.long)

    def hook(_module, args):
        h = args[0]
        z = sae.encode(h.float().reshape(-1, h.shape[-1]))[:, index.to(h.device)]
        removed = (z @ sae.w_dec[:, index.to(h.device)].T) * sae.scale
        return ((h.float() - removed.reshape(*h.shape[:-1], -1)).to(h.dtype),)
    return hook
