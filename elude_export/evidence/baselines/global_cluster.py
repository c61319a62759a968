"""The `global` control: every unit split by one clustering of *images*, shared by all units.

For each K that the plan uses, one spherical k-means of the layer's image contexts (the
routing context: the CLS token's input, centred by the fit mean) on the plan's fit data; a
unit with K_j sub-units routes each image to its cluster in the K_j-clustering. Sizes follow
the images, not the unit: it asks whether ELUDe's *per-unit* splits beat a unit-agnostic
partition of the image space, which groups similar images just as well (a strong control).
Without fit data (`fit_source` None) it covers no layer and says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elude_export.evidence.baselines.base import EvalSetup, SharedForward, SubunitBaseline, image_context, image_max
from elude_export.evidence.baselines.registry import register_baseline
from elude_export.fitting.kmeans import spherical_kmeans
from elude_export.models import model_batches


@register_baseline
class GlobalClusterBaseline(SubunitBaseline):
    name = "global"
    color = "#937860"
    description = "one k-means of the layer's image contexts per K, shared by every unit with that K_j"
    is_control = True

    def __init__(self, setup: EvalSetup):
        super().__init__(setup)
        self.means: dict[str, torch.Tensor] = {}
        self.centroids: dict[str, dict[int, torch.Tensor]] = {}  # layer -> K -> (K, d)

    def fit(self) -> None:
        setup = self.setup
        if setup.fit_source is None:
            setup.log("global-clustering control skipped: no fit data (--sae-data) to cluster")
            return
        contexts = self.image_contexts(setup.fit_source)
        for path, layer in setup.layers.items():
            mean = contexts[path].mean(0)
            points = F.normalize(contexts[path] - mean, dim=-1)
            self.means[path] = mean
            self.centroids[path] = {
                k: spherical_kmeans(points[None], k, seed=setup.config.control_seed).centroids[0]
                for k in sorted({int(k) for k in layer.k.tolist()}) if k > 1}
            setup.log(f"  global control {path}: k-means of {len(points)} image contexts for K in "
                      f"{sorted(self.centroids[path])}")
        self.k_of = {path: layer.k.to(setup.device) for path, layer in setup.layers.items()}
        self.parent_sub = {path: [t.to(setup.device) for t in layer.columns()] for path, layer in setup.layers.items()}

    @torch.no_grad()
    def image_contexts(self, source) -> dict[str, torch.Tensor]:
        """Each layer's image context (B, d) over `source` (CPU, float)."""
        setup = self.setup
        seen: dict[str, list[torch.Tensor]] = {path: [] for path in setup.layers}
        layers = {path: setup.neuron_layers[path] for path in setup.layers}
        # copied: a CLS context is a view that would keep the whole batch input alive
        handles = [layer.input_module.register_forward_pre_hook(
            lambda _m, args, path=path, layer=layer: seen[path].append(
                image_context(layer, args[0]).to("cpu", copy=True)))
            for path, layer in layers.items()]
        dtype = next(setup.model.parameters()).dtype
        try:
            for _indices, batch in model_batches(source, setup.loaded.input_spec, setup.config.batch_size,
                                                 setup.device, dtype, setup.config.sae_limit):
                setup.model(batch)
        finally:
            for handle in handles:
                handle.remove()
        return {path: torch.cat(values) for path, values in seen.items()}

    def observe(self, forward: SharedForward) -> dict[str, torch.Tensor]:
        out = {}
        for path, route in self.routes(forward.contexts).items():
            parent, sub = self.parent_sub[path]
            out[path] = image_max(forward.hidden[path])[:, parent] * (route[:, parent] == sub)
        return out

    def routes(self, contexts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(B, H) sub-unit of every unit per image: its image's cluster in the K_j-clustering."""
        out = {}
        for path, centroids in self.centroids.items():
            points = F.normalize(contexts[path].to(self.setup.device) - self.means[path].to(self.setup.device), dim=-1)
            k_of = self.k_of[path]
            route = torch.zeros(points.shape[0], len(k_of), dtype=torch.long, device=points.device)
            for k, centre in centroids.items():
                assigned = (points @ centre.to(points.device).T).argmax(-1)  # (B,)
                route[:, k_of == k] = assigned[:, None]
            out[path] = route
        return out
