"""timm's MLP families: `Mlp` / ungated `GatedMlp` / `GlobalResponseNormMlp`, `GluMlp` / `SwiGLUPacked`, `SwiGLU`.

`Mlp` and `GlobalResponseNormMlp` come with Linear layers (tokens, or channels-last maps as
in ConvNeXt with conv_mlp=False) or with 1x1 convs (`use_conv=True`: ConvNeXt's default).
"""

from __future__ import annotations

import torch
from torch import nn

from elude_export.layers.base import LayerAdapter, NeuronLayer, is_linear, register_adapter
from elude_export.layers.conv import channel_axis_of, is_pointwise_conv, unit_direction


def _linear_or_pointwise(module: nn.Module) -> bool:
    """fc1 and fc2 both Linear, or both 1x1 convs."""
    return ((is_linear(module.fc1) and is_linear(module.fc2))
            or (is_pointwise_conv(module.fc1) and is_pointwise_conv(module.fc2)))


@register_adapter
class TimmMlpAdapter(LayerAdapter):
    """timm `Mlp` (ViT, DeiT, DINOv2, CLIP ViT, ConvNeXt), `GlobalResponseNormMlp` and `GatedMlp`
    without a gate: h = norm(act(fc1 x))."""

    kind = "mlp"

    def matches(self, module: nn.Module) -> bool:
        from timm.layers import GatedMlp, GlobalResponseNormMlp, Mlp

        if isinstance(module, GatedMlp):
            return isinstance(module.gate, nn.Identity) and is_linear(module.fc1) and is_linear(module.fc2)
        return isinstance(module, (Mlp, GlobalResponseNormMlp)) and _linear_or_pointwise(module)

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        return NeuronLayer(path, module, self.kind, "fc2", lambda m: unit_direction(m.fc1),
                           channel_axis=channel_axis_of(module.fc1))


@register_adapter
class TimmGluMlpAdapter(LayerAdapter):
    """timm `GluMlp` / `SwiGLUPacked`: fc1 is packed [value, gate]; units are signed."""

    kind = "glu"

    def matches(self, module: nn.Module) -> bool:
        from timm.layers import GluMlp

        return isinstance(module, GluMlp) and is_linear(module.fc1) and is_linear(module.fc2)

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        def activated_half(m: nn.Module) -> torch.Tensor:
            # profiles follow the activated (gating) branch: it decides when the unit is on
            first, second = m.fc1.weight.chunk(2, dim=0)
            return second if m.gate_last else first

        return NeuronLayer(path, module, self.kind, "fc2", activated_half, signed=True)


@register_adapter
class TimmSwiGLUAdapter(LayerAdapter):
    """timm `SwiGLU` (EVA-02 and others): h = act(fc1_g x) * fc1_x x; units are signed."""

    kind = "swiglu"

    def matches(self, module: nn.Module) -> bool:
        from timm.layers import SwiGLU

        return isinstance(module, SwiGLU)

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        return NeuronLayer(path, module, self.kind, "fc2", lambda m: m.fc1_g.weight, signed=True)
