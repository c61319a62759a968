"""CNN neuron layers: channels consumed linearly by a convolution (ResNet blocks, conv MLPs, LeViT).

A channel `j` of `act(norm(conv_a(x)))` is a unit when the next conv is linear in it (any
kernel size: `conv_b(h * s)` equals `conv_b(h)` for `s = 1`, so the fused rewrite stays
bitwise). Tokens are spatial positions and the routing context is the pooled input.

A unit's input direction (for contribution profiles `w ⊙ x`) is the producing conv's weight
summed over its kernel, times the BatchNorm scale when one sits between conv and activation:
on a constant input field equal to the pooled context `x̄` (padding aside), the unit's
pre-activation is exactly `<Σ_uv W[j, :, u, v] · bn_scale_j, x̄> + const`, so the direction
agrees with what the context router reads. For a 1x1 conv this is `weight[j, :, 0, 0]`.
"""

from __future__ import annotations

import torch
from torch import nn

from elude_export.layers.base import (ELEMENTWISE_ACTIVATIONS, LayerAdapter, NeuronLayer, is_consumer_conv, is_linear,
                                      register_adapter, sequential_parts)
from elude_export.layers.layout import CHANNELS_FIRST, CHANNELS_LAST


def norm_scale(norm: nn.Module | None) -> torch.Tensor | None:
    """Per-channel scale of an eval-mode BatchNorm (gamma / sqrt(var + eps)); None for other norms."""
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.running_var is None:
        return None
    gamma = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    return gamma / torch.sqrt(norm.running_var + norm.eps)


def unit_direction(producer: nn.Module, norm: nn.Module | None = None) -> torch.Tensor:
    """(units, d_in): the producer's weight, kernel-summed, with a BatchNorm in between folded in."""
    weight = producer.weight
    if weight.ndim == 4:
        weight = weight.sum((2, 3))
    scale = norm_scale(norm)
    return weight if scale is None else weight * scale[:, None]


def is_pointwise_conv(module: object) -> bool:
    return is_consumer_conv(module) and module.kernel_size == (1, 1) and module.groups == 1


def is_dense_producer(module: object) -> bool:
    """Linear, or an ungrouped conv: each unit then has one direction over all input channels."""
    return is_linear(module) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def channel_axis_of(producer: nn.Module) -> int:
    return CHANNELS_FIRST if isinstance(producer, nn.Conv2d) else CHANNELS_LAST


@register_adapter
class ResNetBlockAdapter(LayerAdapter):
    """timm ResNet `BasicBlock` / `Bottleneck`: units are conv1's channels after bn1/act1, consumer conv2."""

    kind = "resnet_block"

    def matches(self, module: nn.Module) -> bool:
        from timm.models.resnet import BasicBlock, Bottleneck

        return (isinstance(module, (BasicBlock, Bottleneck)) and is_dense_producer(module.conv1)
                and is_consumer_conv(module.conv2))

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        # a downsampling BasicBlock's conv1 is strided: the token router then has no position to read
        return NeuronLayer(path, module, self.kind, "conv2", lambda m: unit_direction(m.conv1, m.bn1),
                           channel_axis=CHANNELS_FIRST, token_aligned=tuple(module.conv1.stride) == (1, 1))


@register_adapter
class ConvMlpAdapter(LayerAdapter):
    """timm `ConvMlp` (fc1 -> norm -> act -> fc2) and EfficientFormer's `ConvMlpWithNorm` (norm1)."""

    kind = "conv_mlp"

    def matches(self, module: nn.Module) -> bool:
        from timm.layers import ConvMlp
        from timm.models.efficientformer import ConvMlpWithNorm

        return (isinstance(module, (ConvMlp, ConvMlpWithNorm)) and is_dense_producer(module.fc1)
                and is_consumer_conv(module.fc2))

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        norm_name = "norm1" if hasattr(module, "norm1") else "norm"
        return NeuronLayer(path, module, self.kind, "fc2",
                           lambda m: unit_direction(m.fc1, getattr(m, norm_name)), channel_axis=CHANNELS_FIRST)


@register_adapter
class LevitMlpAdapter(LayerAdapter):
    """timm LeViT `LevitMlp`: ln1 (Linear/Conv + BN) -> act -> ln2; the consumer is ln2's linear part."""

    kind = "levit_mlp"

    def matches(self, module: nn.Module) -> bool:
        from timm.models.levit import LevitMlp

        if not isinstance(module, LevitMlp):
            return False
        producer, consumer = module.ln1.linear, module.ln2.linear
        return is_dense_producer(producer) and (is_linear(consumer) or is_consumer_conv(consumer))

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        return NeuronLayer(path, module, self.kind, "ln2.linear", lambda m: unit_direction(m.ln1.linear, m.ln1.bn),
                           channel_axis=channel_axis_of(module.ln1.linear))


@register_adapter
class SequentialConvMlpAdapter(LayerAdapter):
    """`nn.Sequential(Conv2d 1x1, [BatchNorm2d], activation, [Dropout], Conv2d 1x1)` in any model."""

    kind = "sequential_conv"

    def matches(self, module: nn.Module) -> bool:
        children = sequential_parts(module)
        if len(children) == 4 and isinstance(children[1], nn.BatchNorm2d):
            children = [children[0], children[2], children[3]]
        return (len(children) == 3 and is_pointwise_conv(children[0])
                and isinstance(children[1], ELEMENTWISE_ACTIVATIONS) and is_pointwise_conv(children[2])
                and children[0].out_channels == children[2].in_channels)

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        names = [name for name, child in module.named_children() if isinstance(child, nn.Conv2d)]
        norms = [name for name, child in module.named_children() if isinstance(child, nn.BatchNorm2d)]
        first, consumer = names[0], names[-1]
        norm = norms[0] if norms else None

        def direction(m: nn.Module) -> torch.Tensor:
            return unit_direction(getattr(m, first), getattr(m, norm) if norm else None)

        return NeuronLayer(path, module, self.kind, consumer, direction, channel_axis=CHANNELS_FIRST)
