"""Concept selectivity and token-level mask share: the definitions on constructed cases, one small run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elude_export.data.sources import open_source
from elude_export.evidence.baselines.sae_model import SAEConfig
from elude_export.evidence.labels import compute_labels
from elude_export.evidence.masks import column_mask_share, mask_share, patch_masks, token_mask_evidence
from elude_export.evidence.selectivity import (
    MARGIN_FLOOR, RouteRecorder, concept_images, concept_selectivity, effect, images_changed, pick_by_label,
    summarise, true_class_margin, unit_subunit_names,
)
from elude_export.models.batches import normalize_images
from elude_export.rewrite import apply_plan, set_steers
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


def test_margin_and_effect_of_a_known_ablation():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    assert true_class_margin(logits, torch.tensor([0, 0])).tolist() == [1.0, -5.0]
    concepts = np.repeat(np.arange(16), 2)
    before = torch.zeros(32)
    after = before.clone()
    after[concepts == 3] = -2.0  # the target concept loses 2
    after[concepts == 5] = 0.3  # collateral in both directions must not cancel
    after[concepts == 6] = -0.3
    row = effect(before, after, concepts, 3, MARGIN_FLOOR)
    assert row.target_drop == pytest.approx(2.0) and row.other_change == pytest.approx(0.6 / 15)
    assert row.selectivity == pytest.approx(2.0 / (0.6 / 15)) and not row.floored
    untouched = effect(before, torch.where(torch.as_tensor(concepts == 3), after, before), concepts, 3, MARGIN_FLOOR)
    assert untouched.floored and untouched.selectivity == pytest.approx(2.0 / MARGIN_FLOOR)


def test_summarise_reports_margin_probability_and_accuracy():
    concepts = np.repeat(np.arange(16), 2)
    labels = torch.zeros(32, dtype=torch.long)
    before = torch.tensor([[2.0, 0.0]]).repeat(32, 1)
    after = before.clone()
    after[torch.as_tensor(concepts == 3)] = torch.tensor([0.0, 1.0])  # concept 3 flips to class 1
    row = summarise("c3", "sub-units", 2, 2, before, after, labels, concepts, 3)
    assert row.margin.target_drop == pytest.approx(3.0) and row.margin.other_change == 0.0
    p_before, p_after = torch.tensor([2.0, 0.0]).softmax(0)[0], torch.tensor([0.0, 1.0]).softmax(0)[0]
    assert row.probability.target_drop == pytest.approx(float(p_before - p_after), rel=1e-5)
    assert row.target_accuracy == (1.0, 0.0) and row.other_accuracy == (1.0, 1.0)


def test_label_pick_and_concept_images():
    labels = {"b/0001.0": SubunitLabel("red circle (0.8)", "red circle", 0.8),
              "b/0002.1": SubunitLabel("red circle (0.3)", "red circle", 0.3),
              "b/0003.0": SubunitLabel("unlabelled")}
    assert pick_by_label(labels, "red circle", 0.5) == ["b/0001.0"]
    concepts = np.array([1, 0, 1, 1, 0, 2, 0])
    assert concept_images(concepts, 2).tolist() == [0, 1, 2, 4, 5]
    assert concept_images(concepts, None).tolist() == list(range(7))


@pytest.fixture(scope="module")
def small():
    return small_fitted_plan(seed=0, layer="blocks.3.mlp", k_max=2)


def test_images_not_routed_to_a_steered_subunit_keep_their_logits_bit_for_bit(small):
    """The exactness the fast path relies on: only images routed to an ablated sub-unit can change."""
    loaded, plan = small
    layer = plan.layer("blocks.3.mlp")
    split = [("blocks.3.mlp", int(j)) for j in layer.split_units[:2]]
    steered = [n for n in unit_subunit_names(plan, split) if n.endswith(".1")]
    assert len(steered) == 2
    images = np.concatenate([b for _, b in open_source("embedded:test").subset(np.arange(96)).batches(96)])
    batch = normalize_images(images, loaded.input_spec)
    rewritten = apply_plan(loaded.model.eval(), plan, layers=["blocks.3.mlp"], poolings=())
    recorder = RouteRecorder(rewritten)
    with torch.no_grad():
        before = rewritten(batch)
        used = recorder.close()
        set_steers(rewritten, {n: 0.0 for n in steered})
        after = rewritten(batch)
    changed = images_changed(used, steered, plan)
    assert 0 < int(changed.sum()) < len(batch)
    assert torch.equal(after[~changed], before[~changed])
    assert (after[changed] != before[changed]).any(1).all()


def test_small_selectivity_and_mask_runs(small):
    loaded, plan = small
    calib = open_source("embedded:calib").subset(np.arange(200))
    test = open_source("embedded:test")
    labels = compute_labels(loaded, plan, calib, top_n=5)
    result = concept_selectivity(loaded, plan, labels.labels, test, ["blocks.3.mlp"], min_share=0.3, per_concept=10,
                                 sae_source=calib, sae_config=SAEConfig(n_latents=1, k=8, steps=20, batch_size=128),
                                 top_n=5, label_data=calib.name)
    assert {r.method for r in result.rows} == {"sub-units", "units", "sae"}
    assert len(result.rows) == 3 * 16 and result.images_per_concept == 10
    table = result.table()
    assert "median selectivity (margin, headline)" in table and "| red circle |" in table
    ablated = [r for r in result.rows if r.method == "units" and r.columns]
    assert ablated and all(r.margin is not None and r.images_rerun == 160 for r in ablated)
    subunit_rows = [r for r in result.rows if r.method == "sub-units" and r.columns]
    assert all(r.images_rerun <= 160 for r in subunit_rows)
    saved = result.to_json()
    assert saved["median_selectivity"]["margin"]["units"] == pytest.approx(result.median("units"))
    rows = token_mask_evidence(loaded, {"context": plan}, test.subset(np.arange(160)), {}, ["blocks.3.mlp"],
                               top_n=5, batch_size=64, n_boot=20)
    assert [r.method for r in rows] == ["units", "context sub-units"]
    assert all(0.0 <= r.mean <= 1.0 for r in rows) and 0.1 < rows[0].chance < 0.5
