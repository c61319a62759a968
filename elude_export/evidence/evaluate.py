"""Measure interpretability without humans (METHOD.md, "How interpretability is measured").

On a labelled set not used for fitting, every *column* — an original unit, an ELUDe sub-unit,
a sub-unit of one of two random-split controls, or a sparse-autoencoder latent — is scored by
its top-n activating images (image activation = max over tokens, the `max` tap):
- label purity (share of the majority class) and label entropy (bits);
- concept purity / entropy w.r.t. ground-truth concepts where the data has them (the sharpest
  test: label purity also rewards a column that merely carries the class);
- embedding coherence: activation-weighted mean pairwise cosine of the top-n images in a
  reference embedding (the model's own pre-logit features by default).

Two controls keep every unit's K_j and differ in how much they know:
- `random`: a real plan whose router rows are random directions (in the fitted router's own
  space). Random cells of the context space still group similar images, so this control is
  strong: it asks whether *fitted* directions beat arbitrary ones.
- `shuffle`: ELUDe's own routes, permuted across the images of each batch independently per
  unit: exactly ELUDe's sub-unit sizes, no information about the image at all. It asks
  whether splitting alone (deeper into each unit's ranking) explains the gain.

A column with fewer than n images of positive activation is *unscored*: its top-n would be
padded with images it does not fire on (or purity would come from 1-3 images), so it is
excluded from every mean and counted instead. Means carry 95% bootstrap intervals that
resample parent *units* (a unit's sub-units move together), and differences to the units are
paired by unit. Accuracy of the original and the rewritten model is measured on the same
images; it must be identical, and the logits are compared bitwise.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elude_export.models import model_batches
from elude_export.errors import DataError, PlanError
from elude_export.layers import find_layers
from elude_export.models import LoadedModel
from elude_export.plan import LayerPlan, Plan
from elude_export.rewrite import apply_plan, disentangled_layers
from elude_export.evidence.sae import SAEConfig, SAEHistory, TopKSAE, collect_hidden_tokens, train_sae
from elude_export.data.sources import ImageSource

METHODS = ("units", "elude", "random", "shuffle", "sae")
CONTROLS = ("random", "shuffle")
METRICS = ("label_purity", "concept_purity", "coherence", "label_entropy", "concept_entropy")


# --------------------------------------------------------------------------------------------
# metrics on constructed top-n sets (pure functions, tested on known answers)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# the random-split control
# --------------------------------------------------------------------------------------------

def shuffled_subunit_max(h: torch.Tensor, route: torch.Tensor, parent: torch.Tensor, sub: torch.Tensor,
                         generator: torch.Generator) -> torch.Tensor:
    """(B, S) image max of sub-units whose routes are permuted across the batch, per unit.

    `route` is (B, H) for the context router or (B, T, H) per token; each unit gets its own
    permutation of images, so sub-unit sizes are kept and any link to the image is cut.
    """
    tokens = h if h.ndim == 3 else h.unsqueeze(1)
    order = torch.rand(route.shape[0], route.shape[-1], generator=generator).argsort(0).to(route.device)
    if route.ndim == 2:
        shuffled = route.gather(0, order)
        return tokens.float().amax(1)[:, parent] * (shuffled[:, parent] == sub)
    shuffled = route.gather(0, order[:, None, :].expand_as(route))
    return (tokens.float()[..., parent] * (shuffled[..., parent] == sub)).amax(1)


def random_split_plan(plan: Plan, model: nn.Module, seed: int = 0) -> Plan:
    """Same K_j per unit, router rows random: splitting without any fitted information.

    Each split unit gets K_j Gaussian directions in profile space, projected orthogonal to the
    unit's mean centroid (the common direction of its profiles), times `w1_j`. Without that
    projection one random direction would win for almost every image and the "split" would
    be a no-op; with it the images are cut into K_j pieces of comparable size at random.
    The plan is a real plan: applied, it is as lossless as the fitted one.
    """
    generator = torch.Generator().manual_seed(seed)
    weights_of = {layer.path: layer.unit_weights().float().cpu()
                  for layer in find_layers(model, [layer.path for layer in plan.layers])}
    layers = []
    for layer in plan.layers:
        valid = layer.router_valid  # (Hs, Kmax)
        centroids = layer.centroids.float()
        count = valid.sum(1, keepdim=True).clamp_min(1).float()
        common = F.normalize((centroids * valid[..., None]).sum(1) / count, dim=-1)  # (Hs, d)
        directions = torch.randn(centroids.shape, generator=generator)
        directions = directions - (directions * common[:, None, :]).sum(-1, keepdim=True) * common[:, None, :]
        directions = F.normalize(directions, dim=-1) * valid[..., None]
        router = directions * weights_of[layer.path][layer.split_units][:, None, :]
        layers.append(LayerPlan(layer.path, layer.kind, layer.k.clone(), layer.split_units.clone(),
                                router.contiguous(), directions.contiguous()))
    control = copy.copy(plan)
    control.layers = layers
    control.fit_config = {**plan.fit_config, "control": f"random directions, seed {seed}"}
    return control


# --------------------------------------------------------------------------------------------
# streaming collection
# --------------------------------------------------------------------------------------------

class RunningTopN:
    """Top-n image activations per column over a stream of batches, plus how often each fires."""

    def __init__(self, n: int):
        self.n = n
        self.values: torch.Tensor | None = None  # (<=n, C)
        self.images: torch.Tensor | None = None
        self.active: torch.Tensor | None = None  # (C,) images with activation > 0
        self.seen = 0

    def update(self, activations: torch.Tensor, image_ids: torch.Tensor) -> None:
        activations = activations.detach().float().cpu()
        image_ids = image_ids.cpu()[:, None].expand_as(activations)
        fired = (activations > 0).sum(0)
        self.active = fired if self.active is None else self.active + fired
        self.seen += activations.shape[0]
        if self.values is not None:
            activations = torch.cat([self.values, activations])
            image_ids = torch.cat([self.images, image_ids])
        keep = min(self.n, activations.shape[0])
        self.values, order = activations.topk(keep, dim=0)
        self.images = image_ids.gather(0, order)


@dataclass
class ColumnSet:
    """One family of columns of one layer and what their top-n images are."""

    method: str
    values: np.ndarray  # (n, C) descending
    images: np.ndarray  # (n, C)
    active: np.ndarray  # (C,) images with positive activation
    parent: np.ndarray  # (C,) parent unit (SAE: the latent itself)
    split: np.ndarray  # (C,) parent unit has K > 1 (SAE: True)
    names: list[str]
    metrics: dict[str, np.ndarray] = field(default_factory=dict)  # per column, NaN where unscored

    @property
    def n_columns(self) -> int:
        return int(self.values.shape[1])

    def scored(self, top_n: int) -> np.ndarray:
        return self.active >= top_n


@dataclass
class EvalConfig:
    """How to evaluate; SAE settings apply per layer (latents = that layer's sub-units)."""

    top_n: int = 20
    layers: list[str] | None = None
    batch_size: int = 64
    limit: int | None = None
    bootstrap: int = 1000
    seed: int = 0
    control_seed: int = 0
    sae: bool = True
    sae_k: int = 32
    sae_steps: int = 2000
    sae_batch_size: int = 512
    sae_lr: float = 1e-3
    sae_tokens: int = 200_000
    sae_limit: int | None = None  # SAE training images from the fit data
    mix_min_images: int | None = None  # same-class mix threshold; default max(2, 15% of top_n)


@dataclass
class LayerEvaluation:
    path: str
    n_units: int
    k_counts: dict[int, int]
    columns: dict[str, ColumnSet]
    summary: list[dict[str, Any]]
    sae: dict[str, Any] | None = None
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

    def to_json(self) -> dict[str, Any]:
        return {
            "data": self.data, "n_images": self.n_images, "top_n": self.top_n, "model": self.model,
            "router": self.router, "embedding": self.embedding, "accuracy": self.accuracy, "config": self.config,
            "unscored_rule": f"columns with fewer than top_n={self.top_n} images of positive activation are "
                             "excluded from every metric and counted in 'unscored'",
            "layers": [{"path": l.path, "n_units": l.n_units, "k_counts": {str(k): v for k, v in l.k_counts.items()},
                        "sae": l.sae, "route_balance": l.route_balance, "summary": l.summary} for l in self.layers],
        }

    def table(self, split_only: bool = False) -> str:
        return format_table(self, split_only)


def _image_embedding(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(logits, reference embedding, its name): timm's pre-logit features where the model has them."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        features = model.forward_features(batch)
        return model.forward_head(features), model.forward_head(features, pre_logits=True), "pre_logits"
    logits = model(batch)
    return logits, logits, "logits"


def _hidden_max(h: torch.Tensor) -> torch.Tensor:
    return (h if h.ndim == 3 else h.unsqueeze(1)).float().amax(1)


@dataclass
class _SAEState:
    sae: TopKSAE
    history: SAEHistory
    top: RunningTopN
    error: float = 0.0
    sum_h: torch.Tensor | None = None
    sum_sq: float = 0.0
    count: int = 0
    correct: int = 0


@torch.no_grad()
def evaluate(
    loaded: LoadedModel,
    plan: Plan,
    source: ImageSource,
    config: EvalConfig | None = None,
    sae_source: ImageSource | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = lambda _msg: None,
) -> EvalResult:
    """Score units, ELUDe sub-units, the random control and (with `sae_source`) a TopK SAE."""
    config = config or EvalConfig()
    device = torch.device(device)
    if source.labels is None:
        raise DataError(f"evaluation data {source.name} has no labels: use a labelled set (e.g. embedded:test)")
    if config.top_n < 2:
        raise DataError("--top-n must be at least 2")
    model = loaded.model.eval().to(device)
    paths = config.layers or [layer.path for layer in plan.layers]
    layer_plans = [plan.layer(path) for path in paths]
    neuron_layers = {layer.path: layer for layer in find_layers(model, paths)}
    dtype = next(model.parameters()).dtype

    saes: dict[str, _SAEState] = {}
    if config.sae:
        if sae_source is None:
            raise DataError("the SAE baseline needs the fit data (--sae-data) or must be switched off (--no-sae)")
        log(f"collecting SAE training activations from {sae_source.name}")
        tokens = collect_hidden_tokens(model, list(neuron_layers.values()), sae_source, loaded.input_spec,
                                       config.sae_tokens, config.batch_size, device, config.sae_limit, config.seed)
        for layer_plan in layer_plans:
            sae_config = SAEConfig(n_latents=layer_plan.n_subunits, k=min(config.sae_k, layer_plan.n_subunits),
                                   steps=config.sae_steps, batch_size=config.sae_batch_size, lr=config.sae_lr,
                                   seed=config.seed)
            sae, history = train_sae(tokens[layer_plan.path], sae_config, device)
            saes[layer_plan.path] = _SAEState(sae, history, RunningTopN(config.top_n))
            log(f"  SAE {layer_plan.path}: {sae.n_latents} latents, k={sae.k}, {history.steps} steps in "
                f"{history.seconds:.1f}s, held-out FVU {history.fvu[-1][1]:.4f}")
        del tokens

    rewritten = apply_plan(model, plan, layers=paths, poolings=("max",)).to(device)
    control = apply_plan(model, random_split_plan(plan, model, config.control_seed), layers=paths,
                         poolings=("max",)).to(device)
    tops = {method: {path: RunningTopN(config.top_n) for path in paths}
            for method in ("units", "elude", "random", "shuffle")}
    routes: dict[str, torch.Tensor] = {}
    route_handles = [layer.router.register_forward_hook(
        lambda _m, _i, out, path=path: routes.__setitem__(path, out))
        for path, layer in disentangled_layers(rewritten).items()]
    columns_of = {path: [t.to(device) for t in plan.layer(path).columns()] for path in paths}
    shuffle_generator = torch.Generator().manual_seed(config.control_seed)

    pending: dict[str, torch.Tensor] = {}
    handles = [neuron_layers[path].consumer.register_forward_pre_hook(
        lambda _m, args, path=path: pending.__setitem__(path, args[0])) for path in paths]
    embeddings, labels_seen = [], []
    correct = {"original": 0, "elude": 0, "random": 0}
    identical, control_identical, max_diff = True, True, 0.0
    embedding_name = "pre_logits"
    try:
        for indices, batch in model_batches(source, loaded.input_spec, config.batch_size, device, dtype, config.limit):
            labels = torch.as_tensor(source.labels[indices], device=device)
            ids = torch.as_tensor(indices)
            logits, embedding, embedding_name = _image_embedding(model, batch)
            hidden = dict(pending)
            pending.clear()
            embeddings.append(F.normalize(embedding.float(), dim=-1).cpu())
            labels_seen.append(labels.cpu())
            correct["original"] += int((logits.argmax(1) == labels).sum())
            for path in paths:
                tops["units"][path].update(_hidden_max(hidden[path]), ids)

            elude_logits = rewritten(batch)
            identical &= torch.equal(elude_logits, logits)
            max_diff = max(max_diff, float((elude_logits - logits).abs().max()))
            correct["elude"] += int((elude_logits.argmax(1) == labels).sum())
            for path, layer in disentangled_layers(rewritten).items():
                tops["elude"][path].update(layer.taps["max"], ids)
                parent, sub = columns_of[path]
                tops["shuffle"][path].update(
                    shuffled_subunit_max(hidden[path], routes[path], parent, sub, shuffle_generator), ids)
            control_logits = control(batch)
            control_identical &= torch.equal(control_logits, logits)
            correct["random"] += int((control_logits.argmax(1) == labels).sum())
            for path, layer in disentangled_layers(control).items():
                tops["random"][path].update(layer.taps["max"], ids)

            for path, state in saes.items():
                _sae_batch(model, neuron_layers[path].consumer, state, hidden[path], batch, labels, ids)
    finally:
        for handle in handles + route_handles:
            handle.remove()

    n_images = sum(len(l) for l in labels_seen)
    if n_images == 0:
        raise DataError(f"no evaluation images in {source.name}")
    all_embeddings = torch.cat(embeddings).numpy()
    accuracy = {
        "original": correct["original"] / n_images, "rewritten": correct["elude"] / n_images,
        "random_control": correct["random"] / n_images,
        "rewritten_logits_bitwise_equal": identical, "rewritten_max_abs_logit_diff": max_diff,
        "random_control_logits_bitwise_equal": control_identical,
        "sae_spliced": {path: state.correct / n_images for path, state in saes.items()},
    }
    layers = []
    for layer_plan in layer_plans:
        columns = _column_sets(layer_plan, tops, saes)
        for column_set in columns.values():
            score_columns(column_set, source, all_embeddings, config)
        sae_info = None
        if layer_plan.path in saes:
            state = saes[layer_plan.path]
            sae_info = _sae_summary(state, n_images)
        layers.append(LayerEvaluation(
            layer_plan.path, layer_plan.n_units,
            {int(k): int(c) for k, c in zip(*np.unique(layer_plan.k.numpy(), return_counts=True))},
            columns, summarise_layer(columns, layer_plan, config, source.concepts is not None), sae_info,
            {method: route_balance(columns[method], layer_plan) for method in ("elude", *CONTROLS)},
        ))
    return EvalResult(source.name, n_images, config.top_n, loaded.name, plan.router, embedding_name, accuracy,
                      layers, {k: v for k, v in vars(config).items()})


def _sae_batch(model: nn.Module, consumer: nn.Module, state: _SAEState, h: torch.Tensor, batch: torch.Tensor,
               labels: torch.Tensor, ids: torch.Tensor) -> None:
    """Latent top-n, reconstruction error and spliced accuracy of one SAE on one batch."""
    tokens = h.float().reshape(-1, h.shape[-1])
    latents = state.sae.encode(tokens)
    state.top.update(latents.reshape(h.shape[0], -1, latents.shape[-1]).amax(1), ids)
    state.error += float((state.sae.decode(latents) - tokens).pow(2).sum())
    state.sum_h = tokens.sum(0) if state.sum_h is None else state.sum_h + tokens.sum(0)
    state.sum_sq += float(tokens.pow(2).sum())
    state.count += tokens.shape[0]
    splice = consumer.register_forward_pre_hook(lambda _m, args: (state.sae(args[0].float()).to(args[0].dtype),))
    try:
        state.correct += int((model(batch).argmax(1) == labels).sum())
    finally:
        splice.remove()


def _sae_summary(state: _SAEState, n_images: int) -> dict[str, Any]:
    assert state.sum_h is not None
    variance = state.sum_sq - float(state.sum_h.pow(2).sum()) / max(state.count, 1)
    return {"latents": state.sae.n_latents, "k": state.sae.k, "train_steps": state.history.steps,
            "train_seconds": round(state.history.seconds, 2), "heldout_fvu_train_data": state.history.fvu[-1][1],
            "eval_fvu": state.error / max(variance, 1e-12), "dead_fraction_train": state.history.dead_fraction,
            "spliced_accuracy": state.correct / n_images}


def _column_sets(layer: LayerPlan, tops: dict[str, dict[str, RunningTopN]],
                 saes: dict[str, _SAEState]) -> dict[str, ColumnSet]:
    parent, _sub = layer.columns()
    parent_np = parent.numpy()
    unit_split = (layer.k > 1).numpy()
    names = layer.subunit_names()
    width = max(4, len(str(layer.n_units - 1)))
    unit_names = [f"{layer.path}/{j:0{width}d}" for j in range(layer.n_units)]

    def build(method: str, top: RunningTopN, parents: np.ndarray, split: np.ndarray, labels: list[str]) -> ColumnSet:
        assert top.values is not None and top.images is not None and top.active is not None
        return ColumnSet(method, top.values.numpy(), top.images.numpy(), top.active.numpy(), parents, split, labels)

    out = {
        "units": build("units", tops["units"][layer.path], np.arange(layer.n_units), unit_split, unit_names),
        "elude": build("elude", tops["elude"][layer.path], parent_np, unit_split[parent_np], names),
        "random": build("random", tops["random"][layer.path], parent_np, unit_split[parent_np], names),
        "shuffle": build("shuffle", tops["shuffle"][layer.path], parent_np, unit_split[parent_np], names),
    }
    if layer.path in saes:
        top = saes[layer.path].top
        latents = top.values.shape[1] if top.values is not None else 0
        out["sae"] = build("sae", top, np.arange(latents), np.ones(latents, dtype=bool),
                           [f"{layer.path}/sae{i:04d}" for i in range(latents)])
    return out


def score_columns(columns: ColumnSet, source: ImageSource, embeddings: np.ndarray, config: EvalConfig) -> None:
    """Fill per-column metrics; unscored columns (fewer than top_n active images) get NaN."""
    n = config.top_n
    scored = columns.scored(n)
    count = columns.n_columns
    nan = lambda: np.full(count, np.nan)  # noqa: E731
    metrics = {name: nan() for name in METRICS}
    metrics["class_minus_concept"] = nan()
    metrics["same_class_mix"] = nan()
    if scored.any() and columns.values.shape[0] >= n:
        images = columns.images[:n, scored].T  # (scored, n)
        assert source.labels is not None
        purity, entropy = purity_entropy(source.labels[images])
        metrics["label_purity"][scored], metrics["label_entropy"][scored] = purity, entropy
        if source.concepts is not None:
            c_purity, c_entropy = purity_entropy(source.concepts[images])
            metrics["concept_purity"][scored], metrics["concept_entropy"][scored] = c_purity, c_entropy
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


def summarise_layer(columns: dict[str, ColumnSet], layer: LayerPlan, config: EvalConfig,
                    has_concepts: bool) -> list[dict[str, Any]]:
    """One record per (method, scope): counts, metric means with CIs, deltas vs units and control."""
    rows = []
    metric_names = [m for m in METRICS if has_concepts or not m.startswith("concept")]
    extra = ["class_minus_concept", "same_class_mix"] if has_concepts else []
    for scope in ("all", "split"):
        for method, column_set in columns.items():
            if scope == "split" and method == "sae":
                continue
            keep = column_set.split if scope == "split" else np.ones(column_set.n_columns, dtype=bool)
            scored = column_set.scored(config.top_n) & keep
            row: dict[str, Any] = {"method": method, "scope": scope, "columns": int(keep.sum()),
                                   "scored": int(scored.sum()), "unscored": int((keep & ~scored).sum())}
            for metric in metric_names + extra:
                values = np.where(keep, column_set.metrics[metric], np.nan)[keep]
                row[metric] = mean_ci(values, column_set.parent[keep], config.bootstrap, config.seed)
            if method != "units":
                row["delta_vs_units"] = _deltas(column_set, columns["units"], keep, scope, metric_names, config,
                                                paired=method != "sae", n_units=layer.n_units)
            if method == "elude":
                for control in CONTROLS:
                    row[f"delta_vs_{control}"] = _deltas(column_set, columns[control], keep, scope, metric_names,
                                                         config, paired=True, n_units=layer.n_units, other_keep=keep)
            rows.append(row)
    return rows


def _deltas(columns: ColumnSet, reference: ColumnSet, keep: np.ndarray, scope: str, metrics: list[str],
            config: EvalConfig, paired: bool, n_units: int, other_keep: np.ndarray | None = None) -> dict[str, Any]:
    if other_keep is None:
        other_keep = reference.split if scope == "split" else np.ones(reference.n_columns, dtype=bool)
    out = {}
    for metric in metrics:
        a = np.where(keep, columns.metrics[metric], np.nan)
        b = np.where(other_keep, reference.metrics[metric], np.nan)
        n_groups = n_units if paired else columns.n_columns
        out[metric] = paired_delta_ci(a, columns.parent, b, reference.parent, n_groups, paired, config.bootstrap,
                                      config.seed)
    return out


# --------------------------------------------------------------------------------------------
# presentation
# --------------------------------------------------------------------------------------------

def _fmt(stat: dict[str, Any] | None, signed: bool = False) -> str:
    if not stat or stat.get("mean", stat.get("delta")) is None:
        return "-"
    value = stat.get("mean", stat.get("delta"))
    low, high = stat["ci"]
    form = "{:+.3f}" if signed else "{:.3f}"
    return f"{form.format(value)} [{form.format(low)},{form.format(high)}]"


def format_table(result: EvalResult, split_only: bool = False) -> str:
    """The evaluation as one plain-text table per layer (means [95% CI]; medians in the JSON)."""
    acc = result.accuracy
    lines = [
        f"data {result.data}: {result.n_images} images, top-{result.top_n} per column, model {result.model}, "
        f"router {result.router}, coherence in {result.embedding} space",
        f"accuracy: original {acc['original']:.4f}  rewritten {acc['rewritten']:.4f}  "
        f"(logits bitwise equal: {'yes' if acc['rewritten_logits_bitwise_equal'] else 'NO'}, "
        f"max |diff| {acc['rewritten_max_abs_logit_diff']:.3g})  random control {acc['random_control']:.4f}",
        f"unscored = columns with fewer than {result.top_n} images of positive activation (excluded from means)",
    ]
    has_concepts = any("concept_purity" in row for layer in result.layers for row in layer.summary)
    for layer in result.layers:
        k_text = " ".join(f"K{k}:{n}" for k, n in sorted(layer.k_counts.items()))
        lines.append("")
        balance = " ".join(f"{m} {layer.route_balance.get(m, float('nan')):.2f}" for m in ("elude", *CONTROLS))
        lines.append(f"{layer.path}: {layer.n_units} units ({k_text}); route balance {balance} (1 = even)")
        if layer.sae:
            s = layer.sae
            lines.append(f"  SAE: {s['latents']} latents, k={s['k']}, eval FVU {s['eval_fvu']:.4f}, "
                         f"spliced accuracy {s['spliced_accuracy']:.4f} (original {acc['original']:.4f}), "
                         f"trained {s['train_steps']} steps / {s['train_seconds']:.1f}s")
        header = f"  {'method':<8}{'scope':<6}{'cols':>6}{'unsc':>6}  {'label purity':<22}{'Δ vs units':<25}"
        if has_concepts:
            header += f"{'concept purity':<22}{'Δ vs units':<25}"
        header += f"{'coherence':<22}{'entropy':>8}"
        if has_concepts:
            header += f"{'cls-cpt':>8}{'mix':>6}"
        lines.append(header)
        for row in layer.summary:
            if split_only and row["scope"] != "split":
                continue
            delta = row.get("delta_vs_units", {})
            line = (f"  {row['method']:<8}{row['scope']:<6}{row['columns']:>6}{row['unscored']:>6}  "
                    f"{_fmt(row['label_purity']):<22}{_fmt(delta.get('label_purity'), True):<25}")
            if has_concepts:
                line += f"{_fmt(row['concept_purity']):<22}{_fmt(delta.get('concept_purity'), True):<25}"
            entropy = row["label_entropy"]["mean"]
            line += f"{_fmt(row['coherence']):<22}{'-' if entropy is None else f'{entropy:.2f}':>8}"
            if has_concepts:
                gap, mix = row["class_minus_concept"]["mean"], row["same_class_mix"]["mean"]
                line += f"{'-' if gap is None else f'{gap:.3f}':>8}{'-' if mix is None else f'{mix:.2f}':>6}"
            lines.append(line)
            for control in CONTROLS if row["method"] == "elude" else ():
                vs = row[f"delta_vs_{control}"]
                text = f"  {'':<14}{'':>12}  {'elude - ' + control + ':':<22}{_fmt(vs.get('label_purity'), True):<25}"
                if has_concepts:
                    text += f"{'':<22}{_fmt(vs.get('concept_purity'), True):<25}"
                lines.append(text)
    lines.append("")
    lines.append("controls (same K_j): random = plan with random router directions (lossless, keeps the geometry of "
                 "the routing space); shuffle = ELUDe's routes permuted across images (sizes kept, no information)")
    if has_concepts:
        lines.append("cls-cpt: mean (class purity - concept purity) of the top-n; mix: share of columns whose top-n "
                     "holds >= 2 concepts of its majority class")
    return "\n".join(lines)


def write_json(result: EvalResult, path: str) -> None:
    """JSON with every summary number (NaN written as null)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (np.floating, np.integer)):
            return clean(value.item())
        return value

    from pathlib import Path

    target = Path(path)
    if not target.parent.exists():
        raise DataError(f"output directory {target.parent} does not exist")
    target.write_text(json.dumps(clean(result.to_json()), indent=2) + "\n")


def default_fit_data(data: str) -> str | None:
    """The calibration split that belongs to a known evaluation split (for the SAE's training data)."""
    return {"embedded:test": "embedded:calib", "embedded": "embedded:calib",
            "digits:test": "digits:train"}.get(data)


def check_layers(plan: Plan, layers: list[str] | None) -> None:
    for path in layers or []:
        plan.layer(path)  # raises PlanError naming the plan's layers
    if not plan.layers:
        raise PlanError("plan has no layers")
