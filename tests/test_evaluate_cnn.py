"""`evaluate` and `label` on a CNN plan: every family reads a conv feature map (B, C, h, w) as tokens.

A ResNet's unit is a channel and its tokens are spatial positions; a baseline that took the
last axis as the units (a ViT's layout) would score image width instead of channels. The
reference values below are computed independently from the original model's feature map.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from elude_export.data.sources import open_source
from elude_export.evidence.evaluate import EvalConfig, evaluate
from elude_export.evidence.labels import compute_labels
from elude_export.fitting.fit import FitConfig, fit
from elude_export.layers import find_layers
from elude_export.models import InputSpec, LoadedModel, model_batches

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = ["layer1.0", "layer3.1"]  # 8x8 and 2x2 positions at 32 px


@pytest.fixture(scope="module")
def cnn_plan():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4, zero_init_last=False).eval()
    loaded = LoadedModel(model, "resnet18", InputSpec(3, 32, 32, (0.5,) * 3, (0.25,) * 3), 4)
    config = FitConfig(limit=96, layers=LAYERS, k_rule="fixed", k_max=2, n_init=1, top_m=32, stats_images=96)
    return loaded, fit(loaded, open_source("embedded:calib"), config).plan


def _reference_image_max(loaded, source, layer_path: str, limit: int) -> torch.Tensor:
    """(N, C) image activation of every channel (its spatial max), from the original model's feature map."""
    layer = find_layers(loaded.model, [layer_path])[0]
    seen = []
    handle = layer.consumer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            for _, batch in model_batches(source, loaded.input_spec, 64, torch.device("cpu"), torch.float32, limit):
                loaded.model(batch)
    finally:
        handle.remove()
    feature_map = torch.cat(seen)
    assert feature_map.ndim == 4 and feature_map.shape[-1] > 1  # (N, C, h, w): channels are not the last axis
    return feature_map.flatten(2).amax(2)


def _firing_channels(image_max: torch.Tensor, n: int) -> list[int]:
    """Channels whose top n+1 image activations are positive and distinct (no ties to order)."""
    top = image_max.topk(n + 1, dim=0).values
    ok = (top[-1] > 0) & (top[:-1] - top[1:] > 1e-4).all(0)
    return torch.nonzero(ok).flatten()[:3].tolist()


def test_evaluate_scores_every_family_on_a_cnn_plan(cnn_plan):
    loaded, plan = cnn_plan
    calib = open_source("embedded:calib").subset(np.arange(96))
    test = open_source("embedded:test")
    config = EvalConfig(top_n=4, limit=96, bootstrap=10, sae=True, sae_steps=5, sae_tokens=4000, sae_limit=48)
    result = evaluate(loaded, plan, test, config, sae_source=calib)
    assert result.accuracy["rewritten_logits_bitwise_equal"] is True
    assert [layer.path for layer in result.layers] == LAYERS
    assert set(result.accuracy["sae_spliced"]) == set(LAYERS)
    for layer in result.layers:
        layer_plan = plan.layer(layer.path)
        assert {"units", "elude", "random", "shuffle", "global", "sae"} <= set(layer.columns)
        assert layer.columns["units"].n_columns == layer_plan.n_units  # channels, not positions or widths
        assert layer.columns["elude"].n_columns == layer_plan.n_subunits
        purity = layer.columns["units"].metrics["concept_purity"]
        assert np.isfinite(purity).any() and np.nanmax(purity) <= 1.0
    for path in LAYERS:
        reference = _reference_image_max(loaded, test, path, 96)
        channels = _firing_channels(reference, 4)
        assert channels
        units = next(layer for layer in result.layers if layer.path == path).columns["units"]
        for channel in channels:
            assert units.images[:4, channel].tolist() == reference[:, channel].topk(4).indices.tolist()


def test_labels_of_a_cnn_plan_name_every_channel_by_its_spatial_max(cnn_plan):
    loaded, plan = cnn_plan
    source = open_source("embedded:test")
    labels = compute_labels(loaded, plan, source, top_n=4, limit=64)
    n_units = plan.layer(LAYERS[1]).n_units
    units = [n for n in labels.labels if n.startswith(LAYERS[1] + "/") and "." not in n.rsplit("/", 1)[1]]
    assert len(units) == n_units
    reference = _reference_image_max(loaded, source, LAYERS[1], 64)
    channels = _firing_channels(reference, 4)
    assert channels
    for channel in channels:
        label = labels.labels[f"{LAYERS[1]}/{channel:04d}"]
        assert label.top_images[:4] == reference[:, channel].topk(4).indices.tolist()
