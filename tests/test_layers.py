"""Neuron-layer discovery across layer families, and clear errors when nothing matches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from elude_export.errors import LayerMatchError
from elude_export.layers import find_layers
from elude_export.models import create_embedded_model


class Custom(nn.Module):
    """A hand-written MLP block the generic matcher only accepts when named explicitly."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.0), nn.Linear(32, 8))
        self.custom = Custom()
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.custom(self.seq(x)))


def test_finds_every_vit_mlp() -> None:
    layers = find_layers(create_embedded_model(pretrained=False))
    assert [layer.path for layer in layers] == [f"blocks.{i}.mlp" for i in range(4)]
    assert all(layer.kind == "mlp" and layer.n_units == 384 and layer.d_in == 96 for layer in layers)


def test_patterns_select_and_generic_needs_explicit_name() -> None:
    net = Net()
    assert [layer.path for layer in find_layers(net)] == ["seq"]
    chosen = find_layers(net, ["seq", "custom"])
    assert [(layer.path, layer.kind, layer.n_units) for layer in chosen] == [("seq", "sequential", 32),
                                                                            ("custom", "generic", 16)]
    assert find_layers(create_embedded_model(pretrained=False), ["blocks.[02].mlp"])[1].path == "blocks.2.mlp"


def test_clear_errors() -> None:
    with pytest.raises(LayerMatchError, match="matches no module.*blocks.0.mlp"):
        find_layers(create_embedded_model(pretrained=False), ["blocks.*.ffn"])
    with pytest.raises(LayerMatchError, match="not a neuron layer"):
        find_layers(Net(), ["head"])
    with pytest.raises(LayerMatchError, match="no neuron layer found"):
        find_layers(nn.Sequential(nn.Linear(3, 3)))
