"""Random plans for tests: any K_j pattern and router, without a calibration run."""

from __future__ import annotations

import torch
from torch import nn

from elude_export.layers import find_layers
from elude_export.models import InputSpec, fingerprint_model
from elude_export.plan import LayerPlan, Plan


def random_plan(model: nn.Module, spec: InputSpec, router: str = "context", k_max: int = 3, seed: int = 0,
                split_fraction: float = 0.6, layers: list[str] | None = None) -> Plan:
    generator = torch.Generator().manual_seed(seed)
    layer_plans = []
    for layer in find_layers(model, layers):
        n_units, d_in = layer.n_units, layer.d_in
        k = torch.ones(n_units, dtype=torch.long)
        split_mask = torch.rand(n_units, generator=generator) < split_fraction
        k[split_mask] = torch.randint(2, k_max + 1, (int(split_mask.sum()),), generator=generator)
        split = torch.nonzero(k > 1).flatten()
        width = int(k.max())
        rows = torch.randn(len(split), width, d_in, generator=generator)
        rows *= (torch.arange(width)[None, :] < k[split][:, None]).unsqueeze(-1)
        layer_plans.append(LayerPlan(layer.path, layer.kind, k, split, rows, torch.nn.functional.normalize(rows, dim=-1),
                                     context_token=layer.context_token))
    return Plan(layer_plans, "test-model", fingerprint_model(model), spec, router)


def small_fitted_plan(seed: int, layer: str, k_max: int):
    """An untrained embedded ViT (fixed seed) and a plan fitted on 160 calibration images of one layer."""
    from elude_export.fitting.fit import FitConfig, fit
    from elude_export.models import LoadedModel, create_embedded_model, embedded_input_spec
    from elude_export.data.sources import open_source

    torch.manual_seed(seed)
    loaded = LoadedModel(create_embedded_model(pretrained=False), "embedded", embedded_input_spec(), 4)
    config = FitConfig(limit=160, layers=[layer], k_rule="fixed", k_max=k_max, n_init=1, top_m=64, stats_images=160)
    return loaded, fit(loaded, open_source("embedded:calib"), config).plan
