"""The `shuffle` control: ELUDe's own routes, permuted across the images of each batch per unit.

Exactly ELUDe's sub-unit sizes, no information about the image at all: it asks whether
splitting alone (reaching deeper into each unit's ranking) explains the gain.
"""

from __future__ import annotations

import torch

from elude_export.evidence.baselines.base import EvalSetup, SharedForward, SubunitBaseline, image_max
from elude_export.evidence.baselines.registry import register_baseline


@register_baseline
class ShuffleBaseline(SubunitBaseline):
    name = "shuffle"
    color = "#c4c4c4"
    description = "ELUDe's routes permuted across images (sizes kept, no information)"
    is_control = True

    def __init__(self, setup: EvalSetup):
        super().__init__(setup)
        self.generator = torch.Generator().manual_seed(setup.config.control_seed)
        self.columns_of = {path: [t.to(setup.device) for t in layer.columns()] for path, layer in setup.layers.items()}

    def observe(self, forward: SharedForward) -> dict[str, torch.Tensor]:
        out = {}
        for path, route in forward.routes.items():
            parent, sub = self.columns_of[path]
            out[path] = shuffled_subunit_max(forward.hidden[path], route, parent, sub, self.generator)
        return out


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
        return image_max(h)[:, parent] * (shuffled[:, parent] == sub)
    shuffled = route.gather(0, order[:, None, :].expand_as(route))
    return (tokens.float()[..., parent] * (shuffled[..., parent] == sub)).amax(1)
