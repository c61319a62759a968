"""The routing context is chosen per layer, from what the layer really sees; a context that
carries no information is refused with the reason, and nothing is skipped in silence."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from elude_export.errors import LayerMatchError
from elude_export.layers import find_layers, survey_layers
from elude_export.models import InputSpec
from elude_export.rewrite import apply_plan
from plan_factory import random_plan


def _timm(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.mark.parametrize("name, class_group", [("cait_xxs24_224", "blocks_token_only"),
                                               ("xcit_nano_12_p16_224", "cls_attn_blocks")])
def test_patch_blocks_route_by_mean_and_class_attention_blocks_by_cls(name: str, class_group: str) -> None:
    model = _timm(name, img_size=32, depth=2)
    contexts = {layer.path: layer.context_token for layer in find_layers(model)}
    assert {token for path, token in contexts.items() if path.startswith("blocks.")} == {"mean"}
    assert {token for path, token in contexts.items() if path.startswith(class_group)} == {"cls"}
    plan = random_plan(model, InputSpec(3, 32, 32, (0.5,) * 3, (0.5,) * 3))
    assert {layer.path: layer.context_token for layer in plan.layers} == contexts
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(apply_plan(model, plan)(x), model(x))


def test_vit_blocks_route_by_cls() -> None:
    layers = find_layers(_timm("vit_tiny_patch16_224", img_size=32, depth=2))
    assert {layer.context_token for layer in layers} == {"cls"}


def test_mixer_token_mixing_refused_channel_mlps_work() -> None:
    model = _timm("mixer_s16_224", img_size=64)
    layers = find_layers(model)
    assert layers and all(layer.path.endswith("mlp_channels") for layer in layers)
    assert {layer.context_token for layer in layers} == {"mean"}
    skipped = {item.path: item.reason for item in survey_layers(model, layers)}
    assert all(f"blocks.{i}.mlp_tokens" in skipped for i in range(len(model.blocks)))
    assert "no routing context" in skipped["blocks.0.mlp_tokens"] and "mean is ~0" in skipped["blocks.0.mlp_tokens"]
    with pytest.raises(LayerMatchError, match="blocks.0.mlp_tokens.*cannot be routed.*token-mixing"):
        find_layers(model, ["blocks.0.mlp_tokens"])
    plan = random_plan(model, InputSpec(3, 64, 64, (0.5,) * 3, (0.5,) * 3))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(apply_plan(model, plan)(x), model(x))


class _Odd(nn.Module):
    """An MLP-looking block no adapter knows: three linears around an activation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.act = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 4), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.act(self.b(self.act(self.a(x)))))


def test_survey_names_what_is_skipped_and_why() -> None:
    net = nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)), "odd": _Odd()})
    found = find_layers(net)
    assert [layer.path for layer in found] == ["mlp"]
    skipped = survey_layers(net, found)
    assert [item.path for item in skipped] == ["odd"] and "no layer adapter matches" in skipped[0].reason


def test_data_check_flags_a_cancelling_mean() -> None:
    from elude_export.layers.context import uninformative_context

    model = _timm("mixer_s16_224", img_size=64)
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.blocks[0].mlp_tokens.register_forward_pre_hook(lambda _m, args: seen.update(tokens=args[0])),
             model.blocks[0].mlp_channels.register_forward_pre_hook(lambda _m, args: seen.update(channels=args[0]))]
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    assert uninformative_context(seen["tokens"], "mean")
    assert not uninformative_context(seen["channels"], "mean")
