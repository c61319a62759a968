"""CNN neuron layers: conv channels consumed linearly are units; the rewrite stays lossless on them.

Random weights (BatchNorm statistics randomised so that folding them into unit directions
matters), small images, CPU: fused mode bitwise, explicit mode within 1e-5 (relative to the
output's size), taps pooled per image, the token layout conversion, and unit directions.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from elude_export.compare import compare
from elude_export.layers import CHANNELS_FIRST, find_layers, from_tokens, survey_layers, to_tokens
from elude_export.layers.conv import unit_direction
from elude_export.models import InputSpec
from elude_export.rewrite import apply_plan, read_taps, set_steers
from plan_factory import random_plan


def _cnn(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
            module.weight.data.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
    return model


# (model, kwargs, image size, expected adapter kinds, explicit checked too)
CASES = {
    "resnet18": ("resnet18", {"zero_init_last": False}, 64, {"resnet_block"}, True),
    "resnet50": ("resnet50", {"zero_init_last": False}, 64, {"resnet_block"}, False),
    "convnext_atto": ("convnext_atto", {}, 64, {"mlp"}, True),
    "convnext_atto_channels_last": ("convnext_atto", {"conv_mlp": False}, 64, {"mlp"}, True),
    "levit_128s": ("levit_128s", {"img_size": 64}, 64, {"levit_mlp"}, True),
    "efficientformer_l1": ("efficientformer_l1", {}, 224, {"conv_mlp", "mlp"}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cnn_rewrite_is_lossless(case: str) -> None:
    name, kwargs, size, kinds, check_explicit = CASES[case]
    model = _cnn(name, **kwargs)
    layers = find_layers(model)
    assert {layer.kind for layer in layers} == kinds
    # only stems (conv -> norm -> act -> conv on the raw image) are left, and they are reported
    assert {item.path for item in survey_layers(model, layers)} <= {"stem"}
    assert {layer.context_token for layer in layers} == {"mean"}
    # the first and last layers only: enough for every adapter of the family, and fast
    chosen = [layers[0].path, layers[-1].path]
    plan = random_plan(model, InputSpec(3, size, size, (0.5,) * 3, (0.5,) * 3), layers=chosen)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x)
        fused = apply_plan(model, plan, mode="fused")
        assert torch.equal(fused(x), reference)
        taps = read_taps(fused)
        first = plan.layers[0]
        assert taps[f"tap.{first.path}.max"].shape == (2, first.n_subunits)  # pooled over positions per image
        if check_explicit:
            explicit = apply_plan(model, plan, mode="explicit")
            result = compare("explicit", reference, explicit(x), 1e-5, 1e-5)
            assert result.ok, result.line()
            unit = int(first.split_units[0])
            name0 = first.subunit_names()[int(first.unit_offsets()[unit])]
            set_steers(fused, {name0: 0.0})
            set_steers(explicit, {name0: 0.0})
            steered = compare("steered", fused(x), explicit(x), 1e-5, 1e-5)
            assert steered.ok, steered.line()


def test_unit_direction_folds_batchnorm_and_sums_the_kernel() -> None:
    model = _cnn("resnet18", zero_init_last=False)
    block = model.layer1[0]
    layer = find_layers(model, ["layer1.0"])[0]
    scale = block.bn1.weight / torch.sqrt(block.bn1.running_var + block.bn1.eps)
    expected = block.conv1.weight.sum((2, 3)) * scale[:, None]
    assert layer.channel_axis == CHANNELS_FIRST and layer.consumer is block.conv2
    torch.testing.assert_close(layer.unit_weights(), expected.detach())
    pointwise = nn.Conv2d(4, 6, 1)
    torch.testing.assert_close(unit_direction(pointwise), pointwise.weight[:, :, 0, 0])


def test_token_layout_round_trip() -> None:
    nchw = torch.randn(2, 5, 3, 4)
    tokens = to_tokens(nchw, CHANNELS_FIRST)
    assert tokens.shape == (2, 12, 5) and torch.equal(tokens[:, 1], nchw[:, :, 0, 1])
    assert torch.equal(from_tokens(tokens, nchw, CHANNELS_FIRST), nchw)
    nhwc = nchw.permute(0, 2, 3, 1)
    assert torch.equal(to_tokens(nhwc), tokens) and torch.equal(from_tokens(tokens, nhwc), nhwc)
    assert from_tokens(tokens[:, :1], nchw, CHANNELS_FIRST).shape == (2, 5, 1, 1)


def test_sequential_conv_mlp_and_explicit_conv_pair() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()
    layer = find_layers(nn.ModuleDict({"mlp": net}))[0]
    assert (layer.kind, layer.n_units, layer.d_in, layer.consumer_name) == ("sequential_conv", 8, 3, "3")
