"""Concept selectivity and token-level mask share: the definitions on constructed cases, one small run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elude_export.data.sources import open_source
from elude_export.evidence.baselines.sae_model import SAEConfig
from elude_export.evidence.labels import compute_labels
from elude_export.evidence.masks import column_mask_share, mask_share, patch_masks, token_mask_evidence
from elude_export.evidence.selectivity import FLOOR, _summarise, concept_selectivity, pick_by_label
from elude_export.export.contract import SubunitLabel
from plan_factory import small_fitted_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def test_patch_masks_and_mask_share_on_known_maps():
    pixels = np.zeros((1, 8, 8), dtype=bool)
    pixels[0, :4, :4] = True  # the top-left patch of a 2x2 grid of 4 px patches
    pixels[0, 4, 4] = True  # 1 of 16 pixels: not "mostly object"
    np.testing.assert_array_equal(patch_masks(pixels, 4), [[True, False, False, False]])
    tokens = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 0.0]]])  # (1, 4 patches, 2 columns)
    share = mask_share(tokens, torch.tensor([[True, False, False, False]]), top_tokens=2)
    assert share[0, 0].item() == pytest.approx(0.75) and torch.isnan(share[0, 1])


def test_column_mask_share_uses_each_columns_top_images_and_skips_rare_columns():
    image_max = np.array([[3.0, 0.0], [2.0, 1.0], [1.0, 0.0]])
    share = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    out = column_mask_share(image_max, share, top_n=2)
    assert out[0] == pytest.approx(0.5) and np.isnan(out[1])  # column 1 fires on 1 < 2 images


def test_selectivity_of_a_known_effect_and_the_label_pick():
    concepts = np.repeat(np.arange(16), 2)
    before = (torch.full((32,), 0.9), torch.ones(32, dtype=torch.bool))
    after_p = torch.full((32,), 0.9)
    after_p[concepts == 3] = 0.5  # only concept 3 loses probability
    row = _summarise("c3", "sub-units", 2, before, (after_p, after_p > 0.6), concepts, 3)
    assert row.target_drop == pytest.approx(0.4) and row.other_drop == pytest.approx(0.0, abs=1e-7)
    assert row.selectivity == pytest.approx(0.4 / FLOOR, rel=1e-4)
    assert row.target_accuracy == (1.0, 0.0) and row.other_accuracy == (1.0, 1.0)
    labels = {"b/0001.0": SubunitLabel("red circle (0.8)", "red circle", 0.8),
              "b/0002.1": SubunitLabel("red circle (0.3)", "red circle", 0.3),
              "b/0003.0": SubunitLabel("unlabelled")}
    assert pick_by_label(labels, "red circle", 0.5) == ["b/0001.0"]


def test_small_selectivity_and_mask_runs():
    loaded, plan = small_fitted_plan(seed=0, layer="blocks.3.mlp", k_max=2)
    calib = open_source("embedded:calib").subset(np.arange(200))
    test = open_source("embedded:test").subset(np.arange(160))
    labels = compute_labels(loaded, plan, calib, top_n=5)
    result = concept_selectivity(loaded, plan, labels.labels, calib, test, ["blocks.3.mlp"], min_share=0.3,
                                 sae_config=SAEConfig(n_latents=1, k=8, steps=20, batch_size=128), top_n=5)
    assert {r.method for r in result.rows} == {"sub-units", "units", "sae"}
    assert len(result.rows) == 3 * 16
    assert "median selectivity" in result.table() and "red circle" in result.table()
    ablated = [r for r in result.rows if r.method == "units" and r.columns]
    assert ablated and all(r.target_drop is not None for r in ablated)
    rows = token_mask_evidence(loaded, {"context": plan}, test, {}, ["blocks.3.mlp"],
                               top_n=5, batch_size=64, n_boot=20)
    assert [r.method for r in rows] == ["units", "context sub-units"]
    assert all(0.0 <= r.mean <= 1.0 for r in rows) and 0.1 < rows[0].chance < 0.5
