"""Measure interpretability without humans (METHOD.md, "How interpretability is measured").

On a labelled set not used for fitting, every *column* of every registered family (the
original units, ELUDe's sub-units, the `random` and `shuffle` controls, a sparse autoencoder,
see `baselines/`) is scored by its top-n activating images (image activation =
`vocabulary.IMAGE_POOLING` over tokens): label purity and entropy, concept purity where the
data has ground-truth concepts (label purity also rewards a column that merely carries the
class), and activation-weighted embedding coherence in a reference space (the model's own
pre-logit features by default). Accuracy of the original and the rewritten model is measured
on the same images; it must be identical, and the logits are compared bitwise.

This module only orchestrates: the pass is `collect`, the scoring and statistics `summary`
and `metrics`, the result and its renderings `results`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from elude_export.data.sources import ImageSource
from elude_export.errors import DataError, PlanError
from elude_export.evidence.baselines import Baseline, EvalSetup, registered_baselines
from elude_export.evidence.collect import collect
from elude_export.evidence.results import EvalResult
from elude_export.evidence.summary import evaluate_layer
from elude_export.layers import find_layers
from elude_export.models import LoadedModel
from elude_export.plan import Plan


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
    """Score every registered family (units, ELUDe, controls, the SAE); `sae_source` = the plan's fit data."""
    config = config or EvalConfig()
    if source.labels is None:
        raise DataError(f"evaluation data {source.name} has no labels: use a labelled set (e.g. embedded:test)")
    if config.top_n < 2:
        raise DataError("--top-n must be at least 2")
    setup = make_setup(loaded, plan, config, sae_source, torch.device(device), log)
    baselines: dict[str, Baseline] = {name: kind(setup) for name, kind in registered_baselines().items()}
    for baseline in baselines.values():
        baseline.fit()
    collected = collect(setup, source, baselines)
    accuracy: dict[str, Any] = {"original": collected.original_correct / collected.n_images}
    for baseline in baselines.values():
        accuracy.update(baseline.accuracy(collected.n_images))
    layers = [evaluate_layer(layer, baselines, collected, source, config) for layer in setup.layers.values()]
    return EvalResult(source.name, collected.n_images, config.top_n, loaded.name, plan.router,
                      collected.embedding_name, accuracy, layers, dict(vars(config)),
                      {name: type(baseline) for name, baseline in baselines.items()})


def make_setup(loaded: LoadedModel, plan: Plan, config: EvalConfig, fit_source: ImageSource | None,
           device: torch.device, log: Callable[[str], None]) -> EvalSetup:
    model = loaded.model.eval().to(device)
    paths = config.layers or [layer.path for layer in plan.layers]
    layers = {path: plan.layer(path) for path in paths}
    neuron_layers = {layer.path: layer for layer in find_layers(model, paths)}
    return EvalSetup(loaded, model, plan, layers, neuron_layers, config, device, fit_source, log)


def default_fit_data(data: str) -> str | None:
    """The calibration split that belongs to a known evaluation split (for the SAE's training data)."""
    return {"embedded:test": "embedded:calib", "embedded": "embedded:calib",
            "digits:test": "digits:train"}.get(data)


def check_layers(plan: Plan, layers: list[str] | None) -> None:
    for path in layers or []:
        plan.layer(path)  # raises PlanError naming the plan's layers
    if not plan.layers:
        raise PlanError("plan has no layers")
