"""Concept-selective steering, measured: ablate what is labelled "red circle" and see what breaks.

For each ground-truth concept, the columns whose label (on a labelled set, `labels.py`) is that
concept are ablated together, and the effect on the true class is measured on held-out images
of that concept against images of every other concept:

    selectivity = mean drop on the target concept / mean over the other concepts of the mean |change|

for three handles: ELUDe sub-units (steer 0 on the selected sub-units), their parent units
(steer 0 on every sub-unit of those units: neuron ablation) and, optionally, the TopK-SAE
latents with the same label. The SAE ablation subtracts only the selected latents' decoder
contributions from `h` (`h - W_dec[:, S] z_S`), so the SAE's reconstruction error never enters
the comparison.

The headline effect is the true-class **logit margin** (true logit minus the best other
logit): it is continuous, does not saturate for confidently classified images (a concept at
p = 0.999 can lose 3 logits and still show a probability drop of 0.01) and is invariant to a
shift of all logits. The drop of p(true class) is reported beside it. Collateral on the other
concepts is the mean *absolute* change, so that gains and losses cannot cancel. Denominators
below the floor (`MARGIN_FLOOR`, `PROBABILITY_FLOOR`) are clipped to it and counted.

Speed without approximation: a steer changes nothing on an image that no ablated sub-unit is
routed to (the multiply is by exactly 1.0 everywhere, and later layers see unchanged inputs),
so one clean pass records which sub-units each image uses and each ablation re-runs only the
images it can change; all the others keep their clean logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from elude_export.data.sources import ImageSource
from elude_export.errors import DataError
from elude_export.evidence.baselines.sae_model import SAEConfig, TopKSAE, in_layout, train_layer_saes
from elude_export.evidence.collect import RunningTopN
from elude_export.evidence.labels import label_columns
from elude_export.export.contract import SubunitLabel
from elude_export.layers import find_layers
from elude_export.models import LoadedModel, model_batches
from elude_export.plan import Plan
from elude_export.rewrite import apply_plan, disentangled_layers, reset_steers, set_steers
from elude_export.vocabulary import parse_subunit_name

MARGIN_FLOOR = 1e-2  # logits: smallest collateral a margin ratio is divided by
PROBABILITY_FLOOR = 1e-3  # the same for p(true class)
METHODS = ("sub-units", "units", "sae")
METRICS = ("margin", "probability")  # the headline first


@dataclass
class Effect:
    """One measure of one ablation: drop on the target concept, |change| on the others, their ratio."""

    target_drop: float
    other_change: float  # mean over the other concepts of their mean |change|
    selectivity: float
    floored: bool  # the denominator was clipped to the floor


@dataclass
class Ablation:
    """One handle's ablation for one concept."""

    concept: str
    method: str
    columns: int  # sub-units, units or latents ablated
    images_rerun: int = 0  # images the ablation can change (the others keep their clean logits)
    margin: Effect | None = None
    probability: Effect | None = None
    target_accuracy: tuple[float, float] | None = None  # before, after
    other_accuracy: tuple[float, float] | None = None

    def effect(self, metric: str) -> Effect | None:
        return getattr(self, metric)


@dataclass
class SelectivityResult:
    layers: list[str]
    label_data: str
    eval_data: str
    min_share: float
    images_per_concept: int
    rows: list[Ablation] = field(default_factory=list)
    seconds: float = 0.0

    def median(self, method: str, metric: str = METRICS[0], what: str = "selectivity") -> float | None:
        values = [getattr(r.effect(metric), what) for r in self.rows if r.method == method and r.effect(metric)]
        return float(np.median(values)) if values else None

    def ratio(self, metric: str = METRICS[0]) -> float | None:
        """Median selectivity of sub-units over that of units: the issue's headline figure."""
        sub, units = self.median("sub-units", metric), self.median("units", metric)
        return sub / units if sub is not None and units else None

    def methods(self) -> list[str]:
        return [m for m in METHODS if any(r.method == m for r in self.rows)]

    def to_json(self) -> dict[str, Any]:
        return {"layers": self.layers, "label_data": self.label_data, "eval_data": self.eval_data,
                "min_share": self.min_share, "images_per_concept": self.images_per_concept,
                "floors": {"margin": MARGIN_FLOOR, "probability": PROBABILITY_FLOOR}, "seconds": self.seconds,
                "rows": [asdict(r) for r in self.rows],
                "median_selectivity": {metric: {m: self.median(m, metric) for m in self.methods()}
                                       for metric in METRICS},
                "subunits_over_units": {metric: self.ratio(metric) for metric in METRICS}}

    def table(self) -> str:
        methods = self.methods()
        lines = [f"concept ablation in {', '.join(self.layers)}: columns labelled with the concept on "
                 f"{self.label_data} (share >= {self.min_share:g}), measured on {self.eval_data} "
                 f"({self.images_per_concept} images per concept)",
                 "n = columns ablated; margin drop = mean decrease of (true logit - best other logit) on the concept's "
                 "images; others = mean |change| on the 15 other concepts; sel = drop / others (floored at "
                 f"{MARGIN_FLOOR:g}, *); p sel = the same with p(true class) (floor {PROBABILITY_FLOOR:g}); "
                 "acc = the concept's accuracy before -> after", "",
                 "| concept | " + " | ".join(f"{m}: n / margin drop / others / sel / p sel / acc" for m in methods) + " |",
                 "|---|" + "---|" * len(methods)]
        by_key = {(r.concept, r.method): r for r in self.rows}
        for concept in dict.fromkeys(r.concept for r in self.rows):
            cells = []
            for method in methods:
                r = by_key.get((concept, method))
                if r is None or r.margin is None or r.probability is None or r.target_accuracy is None:
                    cells.append(f"{0 if r is None else r.columns} / - / - / - / - / -")
                    continue
                m, p = r.margin, r.probability
                cells.append(f"{r.columns} / {m.target_drop:+.3f} / {m.other_change:.4f} / "
                             f"{m.selectivity:.1f}{'*' if m.floored else ''} / {p.selectivity:.1f}"
                             f"{'*' if p.floored else ''} / {r.target_accuracy[0]:.2f}->{r.target_accuracy[1]:.2f}")
            lines.append(f"| {concept} | " + " | ".join(cells) + " |")
        lines.append("")
        for metric in METRICS:
            medians = ", ".join(f"{m} {_fmt(self.median(m, metric))}" for m in methods)
            ratio = self.ratio(metric)
            lines.append(f"median selectivity ({metric}{', headline' if metric == METRICS[0] else ''}): {medians}"
                         + ("" if ratio is None else f"; sub-units / units = {ratio:.2f}x"))
        for what, label in (("target_drop", "median margin drop on the target"),
                            ("other_change", "median margin |change| on the others")):
            lines.append(f"{label}: " + ", ".join(f"{m} {_fmt(self.median(m, 'margin', what), '.4f')}"
                                                   for m in methods))
        floored = {m: sum(1 for r in self.rows if r.method == m and r.margin and r.margin.floored) for m in methods}
        lines.append("rows at the margin floor: " + ", ".join(f"{m} {n}" for m, n in floored.items())
                     + f"; {self.seconds:.1f}s")
        return "\n".join(lines)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


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
        lambda _m, args, path=path: seen.__setitem__(path, layers[path].to_tokens(args[0]))) for path in saes]
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


def concept_images(concepts: np.ndarray, per_concept: int | None) -> np.ndarray:
    """Indices of the first `per_concept` images of every concept (all of them for None), sorted."""
    picked = [np.flatnonzero(concepts == c)[:per_concept] for c in np.unique(concepts)]
    return np.sort(np.concatenate(picked))


def true_class_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """True logit minus the best other logit, per image: > 0 exactly where the prediction is right."""
    logits = logits.float()
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return true - others


def effect(before: torch.Tensor, after: torch.Tensor, concepts: np.ndarray, target: int, floor: float) -> Effect:
    """Mean drop on the target concept over the mean (per other concept) of the mean |change|."""
    change = (after - before).double().numpy()
    in_target = concepts == target
    others = [np.abs(change[concepts == c]).mean() for c in np.unique(concepts) if c != target]
    target_drop, other_change = float(-change[in_target].mean()), float(np.mean(others))
    return Effect(target_drop, other_change, target_drop / max(other_change, floor), other_change < floor)


def summarise(concept: str, method: str, columns: int, rerun: int, before: torch.Tensor, after: torch.Tensor,
              labels: torch.Tensor, concepts: np.ndarray, target: int) -> Ablation:
    """One ablation's row, from the clean and the ablated logits of the same images."""
    row = Ablation(concept, method, columns, rerun)
    row.margin = effect(true_class_margin(before, labels), true_class_margin(after, labels), concepts, target,
                        MARGIN_FLOOR)
    p_before, p_after = (x.float().softmax(-1).gather(1, labels[:, None])[:, 0] for x in (before, after))
    row.probability = effect(p_before, p_after, concepts, target, PROBABILITY_FLOOR)
    in_target = torch.as_tensor(concepts == target)
    right_before, right_after = before.argmax(1) == labels, after.argmax(1) == labels
    row.target_accuracy = (float(right_before[in_target].float().mean()), float(right_after[in_target].float().mean()))
    row.other_accuracy = (float(right_before[~in_target].float().mean()),
                          float(right_after[~in_target].float().mean()))
    return row


class RouteRecorder:
    """Which sub-unit columns each image is routed to, per layer, during the clean pass."""

    def __init__(self, rewritten: torch.nn.Module):
        self.layers = disentangled_layers(rewritten)
        self.used: dict[str, list[torch.Tensor]] = {path: [] for path in self.layers}
        self.handles = [layer.router.register_forward_hook(
            lambda _m, _i, route, path=path: self._record(path, route)) for path, layer in self.layers.items()]

    def _record(self, path: str, route: torch.Tensor) -> None:
        consumer = self.layers[path].consumer
        columns = consumer.offsets + route  # (B, H) or (B, T, H)
        columns = columns if columns.ndim == 3 else columns.unsqueeze(1)
        used = torch.zeros(columns.shape[0], int(consumer.steer.numel()), dtype=torch.bool, device=route.device)
        used.scatter_(1, columns.flatten(1), True)
        self.used[path].append(used.cpu())

    def close(self) -> dict[str, torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        return {path: torch.cat(chunks) for path, chunks in self.used.items()}


def images_changed(used: Mapping[str, torch.Tensor], steered: list[str], plan: Plan) -> torch.Tensor:
    """(N,) images routed to at least one steered sub-unit in some layer: the only ones a steer can change."""
    n = next(iter(used.values())).shape[0]
    changed = torch.zeros(n, dtype=torch.bool)
    by_layer: dict[str, list[int]] = {}
    for name in steered:
        path, unit, sub = parse_subunit_name(name)
        by_layer.setdefault(path, []).append(int(plan.layer(path).unit_offsets()[unit]) + sub)
    for path, columns in by_layer.items():
        changed |= used[path][:, columns].any(1)
    return changed


def _logits(model: torch.nn.Module, images: torch.Tensor, rows: torch.Tensor, batch_size: int,
            device: torch.device) -> torch.Tensor:
    """Logits of `images[rows]`, in batches, on the CPU."""
    out = [model(images[chunk].to(device)).float().cpu() for chunk in rows.split(batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def concept_selectivity(loaded: LoadedModel, plan: Plan, subunit_labels: Mapping[str, SubunitLabel],
                        eval_source: ImageSource, layers: list[str], min_share: float = 0.5,
                        per_concept: int | None = None, sae_source: ImageSource | None = None,
                        sae_config: SAEConfig | None = None, top_n: int = 20, batch_size: int = 256,
                        device: torch.device | str = "cpu", label_data: str = "",
                        log: Callable[[str], None] = lambda _m: None) -> SelectivityResult:
    """Ablate each concept's sub-units, their parent units and (with `sae_config`) its SAE latents."""
    import time

    from elude_export.data.concepts import N_CONCEPTS, concept_name

    started = time.perf_counter()
    if eval_source.concepts is None or eval_source.labels is None:
        raise DataError(f"{eval_source.name} has no ground-truth concepts: use embedded:test")
    if sae_config is not None and sae_source is None:
        raise DataError("the SAE rows need the plan's fit data to train on (e.g. embedded:calib)")
    device = torch.device(device)
    source = eval_source.subset(concept_images(np.asarray(eval_source.concepts), per_concept))
    concepts = np.asarray(source.concepts)
    labels = torch.as_tensor(np.asarray(source.labels), dtype=torch.long)
    model = loaded.model.eval().to(device)
    dtype = next(model.parameters()).dtype
    images = torch.cat([b.cpu() for _, b in model_batches(source, loaded.input_spec, batch_size, device, dtype)])
    rewritten = apply_plan(model, plan, layers=layers, poolings=()).to(device)
    everything = torch.arange(len(images))
    recorder = RouteRecorder(rewritten)
    try:
        before = _logits(rewritten, images, everything, batch_size, device)
    finally:
        used = recorder.close()
    saes: dict[str, TopKSAE] = {}
    sae_labels: dict[str, SubunitLabel] = {}
    if sae_config is not None and sae_source is not None:  # optional: their training is the slow part
        log(f"training SAEs on {sae_source.name} for {', '.join(layers)}")
        saes = train_layer_saes(model, find_layers(model, layers), {p: plan.layer(p).n_subunits for p in layers},
                                sae_source, loaded.input_spec, sae_config, batch_size, device, log)
        sae_labels = sae_latent_labels(loaded, saes, sae_source, top_n, batch_size, device)
    neuron_layers = {layer.path: layer for layer in find_layers(model, layers)}
    wanted = set(layers)
    subunit_labels = {n: l for n, l in subunit_labels.items()
                      if n.rsplit("/", 1)[0] in wanted and "." in n.rsplit("/", 1)[1]}
    result = SelectivityResult(layers, label_data, eval_source.name, min_share,
                               int(np.bincount(concepts).min()))
    for concept in range(N_CONCEPTS):
        name = concept_name(concept)
        picked = pick_by_label(subunit_labels, name, min_share)
        units = sorted({parse_subunit_name(n)[:2] for n in picked})
        for method, steered, count in (("sub-units", picked, len(picked)),
                                       ("units", unit_subunit_names(plan, units), len(units))):
            if not steered:
                result.rows.append(Ablation(name, method, 0))
                continue
            rows = torch.nonzero(images_changed(used, steered, plan)).flatten()
            after = before.clone()
            set_steers(rewritten, {n: 0.0 for n in steered})
            try:
                after[rows] = _logits(rewritten, images, rows, batch_size, device)
            finally:
                reset_steers(rewritten)
            result.rows.append(summarise(name, method, count, len(rows), before, after, labels, concepts, concept))
        latents = pick_by_label(sae_labels, name, min_share)
        if saes and not latents:
            result.rows.append(Ablation(name, "sae", 0))
        elif latents:
            handles = [neuron_layers[path].consumer.register_forward_pre_hook(
                _sae_ablation(saes[path], _latent_index(latents, path), neuron_layers[path].channel_axis))
                for path in layers if _latent_index(latents, path)]
            try:
                after = _logits(model, images, everything, batch_size, device)
            finally:
                for handle in handles:
                    handle.remove()
            result.rows.append(summarise(name, "sae", len(latents), len(images), before, after, labels, concepts,
                                         concept))
        log(f"  {name}: {len(picked)} sub-units of {len(units)} units, {len(latents)} SAE latents")
    result.seconds = time.perf_counter() - started
    return result


def unit_subunit_names(plan: Plan, units: list[tuple[str, int]]) -> list[str]:
    """Every sub-unit name of the given (layer, unit) pairs: steering them all ablates the unit."""
    out = []
    for path in dict.fromkeys(path for path, _ in units):
        layer = plan.layer(path)
        wanted = torch.zeros(layer.n_units, dtype=torch.bool)
        wanted[[unit for p, unit in units if p == path]] = True
        names = layer.subunit_names()
        out += [names[c] for c in torch.nonzero(wanted[layer.columns()[0]]).flatten().tolist()]
    return out


def _latent_index(names: list[str], path: str) -> list[int]:
    return [int(n.rsplit("/sae", 1)[1]) for n in names if n.rsplit("/", 1)[0] == path]


def _sae_ablation(sae: TopKSAE, latents: list[int], channel_axis: int) -> Callable:
    """Consumer pre-hook: h minus the chosen latents' decoder contributions (the rest of h untouched)."""
    index = torch.as_tensor(latents, dtype=torch.long)

    def remove(tokens: torch.Tensor) -> torch.Tensor:
        z = sae.encode(tokens.reshape(-1, tokens.shape[-1]))[:, index.to(tokens.device)]
        removed = (z @ sae.w_dec[:, index.to(tokens.device)].T) * sae.scale
        return tokens - removed.reshape(tokens.shape)

    def hook(_module, args):
        h = args[0]
        return (in_layout(remove, h.float(), channel_axis).to(h.dtype),)
    return hook
