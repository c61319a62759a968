"""The `sae` baseline: one TopK sparse autoencoder per layer, as many latents as the layer has sub-units.

It trains on the plan's fit data (never on the evaluation images), and unlike ELUDe it is
lossy: the evaluation measures its reconstruction error and the accuracy of the model with
the reconstruction spliced in. Its latents have no parent unit, so comparisons with the
units are unpaired and there is no split scope. Switched off (`EvalConfig.sae = False`) it
covers no layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from elude_export.errors import DataError
from elude_export.evidence.baselines.base import Baseline, Columns, EvalSetup, SharedForward
from elude_export.evidence.baselines.registry import register_baseline
from elude_export.evidence.baselines.sae_model import (
    SAEConfig, SAEHistory, TopKSAE, collect_hidden_tokens, in_layout, train_sae,
)
from elude_export.layers import NeuronLayer
from elude_export.plan import LayerPlan


@dataclass
class _SAEState:
    """One layer's SAE and what the evaluation pass has measured of it so far."""

    sae: TopKSAE
    history: SAEHistory
    error: float = 0.0
    sum_h: torch.Tensor | None = None
    sum_sq: float = 0.0
    count: int = 0
    correct: int = 0


@register_baseline
class SAEBaseline(Baseline):
    name = "sae"
    color = "#55a868"
    paired_with_units = False
    has_split_scope = False
    info_key = "sae"

    def __init__(self, setup: EvalSetup):
        super().__init__(setup)
        self.states: dict[str, _SAEState] = {}
        if setup.config.sae and setup.fit_source is None:  # say so before anything slow runs
            raise DataError("the SAE baseline needs the fit data (--sae-data) or must be switched off (--no-sae)")

    def fit(self) -> None:
        setup, config = self.setup, self.setup.config
        if not config.sae:
            return
        assert setup.fit_source is not None
        setup.log(f"collecting SAE training activations from {setup.fit_source.name}")
        tokens = collect_hidden_tokens(setup.model, list(setup.neuron_layers.values()), setup.fit_source,
                                       setup.loaded.input_spec, config.sae_tokens, config.batch_size, setup.device,
                                       config.sae_limit, config.seed)
        for path, layer in setup.layers.items():
            sae_config = SAEConfig(n_latents=layer.n_subunits, k=min(config.sae_k, layer.n_subunits),
                                   steps=config.sae_steps, batch_size=config.sae_batch_size, lr=config.sae_lr,
                                   seed=config.seed)
            sae, history = train_sae(tokens[path], sae_config, setup.device)
            self.states[path] = _SAEState(sae, history)
            setup.log(f"  SAE {path}: {sae.n_latents} latents, k={sae.k}, {history.steps} steps in "
                      f"{history.seconds:.1f}s, held-out FVU {history.fvu[-1][1]:.4f}")

    def observe(self, forward: SharedForward) -> dict[str, torch.Tensor]:
        return {path: self._observe_layer(state, self.setup.neuron_layers[path], forward.hidden[path], forward)
                for path, state in self.states.items()}

    def _observe_layer(self, state: _SAEState, layer: NeuronLayer, h: torch.Tensor,
                       forward: SharedForward) -> torch.Tensor:
        """Latent image maxima, reconstruction error and spliced accuracy of one SAE on one batch (h: tokens)."""
        tokens = h.float().reshape(-1, h.shape[-1])
        latents = state.sae.encode(tokens)
        state.error += float((state.sae.decode(latents) - tokens).pow(2).sum())
        state.sum_h = tokens.sum(0) if state.sum_h is None else state.sum_h + tokens.sum(0)
        state.sum_sq += float(tokens.pow(2).sum())
        state.count += tokens.shape[0]
        splice = layer.consumer.register_forward_pre_hook(
            lambda _m, args: (in_layout(state.sae, args[0].float(), layer.channel_axis).to(args[0].dtype),))
        try:
            state.correct += int((self.setup.model(forward.batch).argmax(1) == forward.labels).sum())
        finally:
            splice.remove()
        return latents.reshape(h.shape[0], -1, latents.shape[-1]).amax(1)

    def columns(self, layer: LayerPlan) -> Columns:
        latents = self.states[layer.path].sae.n_latents
        return Columns(np.arange(latents), np.ones(latents, dtype=bool),
                       [f"{layer.path}/sae{i:04d}" for i in range(latents)])

    def accuracy(self, n_images: int) -> dict[str, Any]:
        return {"sae_spliced": {path: state.correct / n_images for path, state in self.states.items()}}

    def layer_info(self, path: str, n_images: int) -> dict[str, Any] | None:
        state = self.states.get(path)
        if state is None:
            return None
        assert state.sum_h is not None
        variance = state.sum_sq - float(state.sum_h.pow(2).sum()) / max(state.count, 1)
        history = state.history
        return {"latents": state.sae.n_latents, "k": state.sae.k, "train_steps": history.steps,
                "train_seconds": round(history.seconds, 2), "heldout_fvu_train_data": history.fvu[-1][1],
                "eval_fvu": state.error / max(variance, 1e-12), "dead_fraction_train": history.dead_fraction,
                "spliced_accuracy": state.correct / n_images}

    @classmethod
    def layer_lines(cls, info: dict[str, Any] | None, accuracy: dict[str, Any]) -> list[str]:
        if not info:
            return []
        return [f"  SAE: {info['latents']} latents, k={info['k']}, eval FVU {info['eval_fvu']:.4f}, "
                f"spliced accuracy {info['spliced_accuracy']:.4f} (original {accuracy['original']:.4f}), "
                f"trained {info['train_steps']} steps / {info['train_seconds']:.1f}s"]
