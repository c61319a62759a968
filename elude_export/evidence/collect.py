"""The one streaming pass over the evaluation images that every family of columns reads from.

Per batch the original model runs once (logits, reference embedding, each layer's consumer
input) and the ELUDe-rewritten model once (logits, image taps, routes); each baseline turns
that into image-level column activations, and only their running top-n is kept, so memory
does not grow with the number of images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elude_export.data.sources import ImageSource
from elude_export.errors import DataError
from elude_export.evidence.baselines.base import Baseline, EvalSetup, SharedForward, image_context
from elude_export.models import model_batches
from elude_export.rewrite import apply_plan, disentangled_layers
from elude_export.vocabulary import IMAGE_POOLING


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
class Collected:
    """What the pass leaves behind: top-n per baseline and layer, embeddings, the original's accuracy."""

    n_images: int
    embeddings: np.ndarray  # (N, D) L2-normalised reference embeddings, row = image id
    embedding_name: str
    original_correct: int
    tops: dict[str, dict[str, RunningTopN]]  # baseline -> layer -> top-n


def image_embedding(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(logits, reference embedding, its name): timm's pre-logit features where the model has them."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        features = model.forward_features(batch)
        return model.forward_head(features), model.forward_head(features, pre_logits=True), "pre_logits"
    logits = model(batch)
    return logits, logits, "logits"


@torch.no_grad()
def collect(setup: EvalSetup, source: ImageSource, baselines: Mapping[str, Baseline]) -> Collected:
    """Run the shared forward over `source` and feed every baseline's columns into its top-n."""
    assert source.labels is not None
    config, device, model = setup.config, setup.device, setup.model
    rewritten = apply_plan(model, setup.plan, layers=list(setup.layers), poolings=(IMAGE_POOLING,)).to(device)
    rewritten_layers = disentangled_layers(rewritten)
    hidden: dict[str, torch.Tensor] = {}
    routes: dict[str, torch.Tensor] = {}
    handles = [layer.consumer.register_forward_pre_hook(  # as tokens, whatever the family's layout (ViT, CNN)
        lambda _m, args, layer=layer: hidden.__setitem__(layer.path, layer.to_tokens(args[0])))
        for layer in setup.neuron_layers.values()]
    handles += [layer.router.register_forward_hook(lambda _m, _i, out, path=path: routes.__setitem__(path, out))
                for path, layer in rewritten_layers.items()]
    contexts: dict[str, torch.Tensor] = {}
    handles += [layer.input_module.register_forward_pre_hook(
        lambda _m, args, layer=layer: contexts.__setitem__(layer.path, image_context(layer, args[0])))
        for layer in setup.neuron_layers.values()]
    tops: dict[str, dict[str, RunningTopN]] = {name: {} for name in baselines}
    embeddings, correct, n_images, embedding_name = [], 0, 0, "pre_logits"
    dtype = next(model.parameters()).dtype
    try:
        for indices, batch in model_batches(source, setup.loaded.input_spec, config.batch_size, device, dtype,
                                            config.limit):
            labels = torch.as_tensor(source.labels[indices], device=device)
            logits, embedding, embedding_name = image_embedding(model, batch)
            # before any other forward (a spliced SAE, a control) overwrites them
            consumed, seen_contexts = dict(hidden), dict(contexts)
            rewritten_logits = rewritten(batch)
            forward = SharedForward(
                batch, labels, torch.as_tensor(indices), logits, consumed, rewritten_logits,
                {path: layer.taps[IMAGE_POOLING] for path, layer in rewritten_layers.items()},
                {path: routes[path] for path in rewritten_layers}, seen_contexts)
            embeddings.append(F.normalize(embedding.float(), dim=-1).cpu())
            correct += int((logits.argmax(1) == labels).sum())
            n_images += len(indices)
            for name, baseline in baselines.items():
                for path, activations in baseline.observe(forward).items():
                    tops[name].setdefault(path, RunningTopN(config.top_n)).update(activations, forward.ids)
    finally:
        for handle in handles:
            handle.remove()
    if n_images == 0:
        raise DataError(f"no evaluation images in {source.name}")
    return Collected(n_images, torch.cat(embeddings).numpy(), embedding_name, correct, tops)
