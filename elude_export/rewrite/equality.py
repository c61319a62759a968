"""Check that a rewritten PyTorch model computes exactly what the original does."""

from __future__ import annotations

import torch

from elude_export.models import model_batches
from elude_export.compare import Comparison, compare
from elude_export.models import LoadedModel
from elude_export.plan import Plan
from elude_export.rewrite import apply_plan
from elude_export.data.sources import ImageSource

# fused with steers at 1 must be bitwise equal; explicit re-associates fc2's sum
MODE_TOLERANCE = {"fused": (0.0, 0.0), "explicit": (1e-5, 1e-5)}


@torch.no_grad()
def check_rewrite(loaded: LoadedModel, plan: Plan, source: ImageSource, n_images: int = 256,
                  modes: tuple[str, ...] = ("fused", "explicit"), batch_size: int = 64,
                  device: torch.device | str = "cpu") -> list[Comparison]:
    """Original vs rewritten outputs on real images, per mode."""
    device = torch.device(device)
    model = loaded.model.eval().to(device)
    dtype = next(model.parameters()).dtype
    batches = [batch for _, batch in model_batches(source, loaded.input_spec, batch_size, device, dtype, n_images)]
    reference = torch.cat([model(batch) for batch in batches])
    results = []
    for mode in modes:
        rewritten = apply_plan(model, plan, mode=mode, poolings=())
        output = torch.cat([rewritten(batch) for batch in batches])
        atol, rtol = MODE_TOLERANCE[mode]
        results.append(compare(f"{mode} output", reference, output, atol, rtol, classifier=loaded.num_classes > 1))
    return results
