"""Interpretability metrics on known answers, the random control, and a small end-to-end evaluation."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from elude_export.cli import main
from elude_export.errors import DataError
from elude_export.evidence.baselines.random_split import random_split_plan
from elude_export.evidence.baselines.shuffle import shuffled_subunit_max
from elude_export.evidence.collect import RunningTopN
from elude_export.evidence.evaluate import EvalConfig, evaluate
from elude_export.evidence.metrics import (
    mean_ci, paired_delta_ci, purity_entropy, same_class_concept_mix, weighted_coherence,
)
from elude_export.evidence.results import EvalResult, write_json
from elude_export.rewrite import apply_plan
from elude_export.data.sources import open_source
from plan_factory import random_plan, small_fitted_plan


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """An untrained embedded ViT (fixed seed), a plan fitted on 160 calibration images, its files."""
    loaded, plan = small_fitted_plan(seed=0, layer="blocks.1.mlp", k_max=3)
    model = loaded.model
    folder = tmp_path_factory.mktemp("evaluate")
    checkpoint = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    plan_path = plan.save(folder / "plan.safetensors")
    return loaded, plan, checkpoint, plan_path


# ---------------------------------------------------------------- metrics on constructed cases

def test_purity_and_entropy_of_known_top_sets():
    purity, entropy = purity_entropy(np.array([[0, 0, 0, 0], [0, 1, 0, 1], [0, 1, 2, 3], [2, 2, 2, 5]]))
    np.testing.assert_allclose(purity, [1.0, 0.5, 0.25, 0.75])
    expected_last = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))
    np.testing.assert_allclose(entropy, [0.0, 1.0, 2.0, expected_last])


def test_weighted_coherence_of_known_embeddings():
    same = np.tile(np.array([[1.0, 0.0, 0.0]]), (4, 1))
    orthogonal = np.eye(3)
    # two images along x with large weight, one along y with tiny weight -> close to 1
    mostly_x = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    coherence = weighted_coherence(np.stack([same[:3], orthogonal, mostly_x]),
                                   np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [10.0, 10.0, 0.01]]))
    assert coherence[0] == pytest.approx(1.0)
    assert coherence[1] == pytest.approx(0.0)
    # pairs: (x,x) weight 100 cos 1; (x,y) weights 0.1 twice, cos 0
    assert coherence[2] == pytest.approx(200.0 / (200.0 + 0.4))


def test_same_class_concept_mix():
    classes = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]])
    concepts = np.array([[3, 3, 7, 7, 5, 5], [3, 3, 3, 7, 5, 5]])
    np.testing.assert_array_equal(same_class_concept_mix(classes, concepts, min_images=2), [True, False])


def test_bootstrap_ci_and_paired_delta():
    rng = np.random.default_rng(0)
    values = rng.normal(0.5, 0.1, 400)
    stat = mean_ci(values, n_boot=300)
    assert stat["ci"][0] < stat["mean"] < stat["ci"][1]
    assert stat["ci"][1] - stat["ci"][0] < 0.05
    assert mean_ci(np.full(10, 0.3), n_boot=50)["ci"] == pytest.approx([0.3, 0.3])
    assert mean_ci(np.array([np.nan, np.nan]))["mean"] is None
    # sub-units of unit g are a = unit value + 0.1: paired delta is exactly 0.1 with a tight CI
    units = rng.uniform(0, 1, 50)
    parents = np.repeat(np.arange(50), 3)
    delta = paired_delta_ci(units[parents] + 0.1, parents, units, np.arange(50), 50, paired=True, n_boot=200)
    assert delta["delta"] == pytest.approx(0.1)
    assert delta["ci"] == pytest.approx([0.1, 0.1])


def test_running_top_n_matches_a_full_sort():
    rng = np.random.default_rng(1)
    data = torch.tensor(rng.normal(size=(57, 6)), dtype=torch.float32)
    top = RunningTopN(5)
    for start in range(0, 57, 8):
        top.update(data[start:start + 8], torch.arange(start, min(start + 8, 57)))
    values, images = data.topk(5, dim=0)
    torch.testing.assert_close(top.values, values)
    torch.testing.assert_close(top.images, images)
    torch.testing.assert_close(top.active, (data > 0).sum(0))


# ---------------------------------------------------------------- the random control

@pytest.mark.parametrize("which", ["fitted", "mixed_k"])
def test_random_control_keeps_k_and_is_lossless(small_run, which):
    loaded, plan, _, _ = small_run
    if which == "mixed_k":  # K_j from 1 to 4, so some router rows are padding
        plan = random_plan(loaded.model, loaded.input_spec, k_max=4, seed=2, layers=["blocks.1.mlp"])
    control = random_split_plan(plan, loaded.model, seed=3)
    for original, random_layer in zip(plan.layers, control.layers):
        assert torch.equal(original.k, random_layer.k)
        assert torch.equal(original.split_units, random_layer.split_units)
        invalid = ~random_layer.router_valid
        assert float(random_layer.router[invalid].abs().sum()) == 0.0
        assert bool((random_layer.router[random_layer.router_valid].abs().sum(-1) > 0).all())
        assert not torch.allclose(original.router, random_layer.router)
    batch = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(apply_plan(loaded.model, control)(batch), loaded.model(batch))


def test_shuffle_control_keeps_sizes_and_cuts_the_link_to_the_image():
    generator = torch.Generator().manual_seed(0)
    h = torch.rand(64, 5, 3) + 0.1  # (images, tokens, units), all positive
    route = torch.randint(0, 2, (64, 3))  # context routes of 3 units with K=2
    parent = torch.tensor([0, 0, 1, 1, 2, 2])
    sub = torch.tensor([0, 1, 0, 1, 0, 1])
    taps = shuffled_subunit_max(h, route, parent, sub, generator)
    fired = (taps > 0).sum(0)
    expected = torch.stack([(route[:, parent[c]] == sub[c]).sum() for c in range(6)])
    assert torch.equal(fired, expected)  # same number of images per sub-unit
    unit_max = h.amax(1)
    nonzero = taps > 0
    assert torch.equal(taps[nonzero], unit_max[:, parent][nonzero])  # a fired sub-unit carries the unit's value
    assert not torch.equal(nonzero, route[:, parent] == sub)  # but on other images
    token_route = torch.randint(0, 2, (64, 5, 3))
    token_taps = shuffled_subunit_max(h, token_route, parent, sub, generator)
    assert token_taps.shape == (64, 6) and bool((token_taps <= unit_max[:, parent]).all())


# ---------------------------------------------------------------- end to end

def test_evaluate_small_run_identical_accuracy_and_table_fields(small_run, tmp_path):
    loaded, plan, _, _ = small_run
    config = EvalConfig(top_n=5, limit=96, bootstrap=50, sae_steps=30, sae_batch_size=128, sae_tokens=3000,
                        sae_limit=64, sae_k=8)
    result = evaluate(loaded, plan, open_source("embedded:test"), config, sae_source=open_source("embedded:calib"))
    accuracy = result.accuracy
    assert accuracy["original"] == accuracy["rewritten"]
    assert accuracy["rewritten_logits_bitwise_equal"] and accuracy["rewritten_max_abs_logit_diff"] == 0.0
    assert accuracy["random_control_logits_bitwise_equal"]
    assert 0.0 <= accuracy["sae_spliced"]["blocks.1.mlp"] <= 1.0
    (layer,) = result.layers
    assert set(layer.columns) == {"units", "elude", "random", "shuffle", "global", "sae"}
    for method in ("elude", "random", "shuffle", "global"):
        assert layer.columns[method].n_columns == plan.layers[0].n_subunits
    # the shuffle control keeps ELUDe's sub-unit sizes exactly (same routes, other images)
    assert layer.route_balance["shuffle"] == pytest.approx(layer.route_balance["elude"], abs=0.05)
    assert layer.columns["sae"].n_columns == plan.layers[0].n_subunits
    rows = {(row["method"], row["scope"]): row for row in layer.summary}
    assert set(rows) >= {("units", "all"), ("elude", "all"), ("random", "all"), ("shuffle", "all"), ("sae", "all"),
                         ("elude", "split")}
    for row in rows.values():
        assert row["columns"] == row["scored"] + row["unscored"]
        for metric in ("label_purity", "concept_purity", "coherence", "label_entropy", "shape_purity",
                       "colour_purity", "factor_purity"):
            assert {"mean", "median", "ci", "n"} <= set(row[metric])
        # a pure pair is pure in each factor: factor purities bound concept purity from above
        if row["concept_purity"]["mean"] is not None:
            assert row["factor_purity"]["mean"] >= row["concept_purity"]["mean"] - 1e-9
            assert row["factor_purity"]["mean"] >= max(row["shape_purity"]["mean"], row["colour_purity"]["mean"]) - 1e-9
    assert {"delta_vs_random", "delta_vs_shuffle", "delta_vs_global"} <= set(rows[("elude", "all")])
    assert layer.info["sae"]["eval_fvu"] >= 0.0
    text = result.table()
    for field in ("label purity", "concept purity", "coherence", "unsc", "elude - random", "elude - shuffle",
                  "elude - global", "SAE:", "logits bitwise equal: yes", "colour", "factor"):
        assert field in text
    out = tmp_path / "eval.json"
    write_json(result, str(out))
    saved = json.loads(out.read_text())
    assert saved["accuracy"]["original"] == accuracy["original"]
    assert saved["layers"][0]["summary"]


def _invoke(args):
    return CliRunner().invoke(main, args)


def test_cli_evaluate_runs_and_writes_json(small_run, tmp_path):
    _, _, checkpoint, plan_path = small_run
    out = tmp_path / "e.json"
    result = _invoke(["evaluate", "--plan", str(plan_path), "--checkpoint", str(checkpoint), "--limit", "64",
                      "--top-n", "4", "--no-sae", "--bootstrap", "20", "--device", "cpu", "--json-out", str(out),
                      "--split-only"])
    assert result.exit_code == 0, result.output
    assert "label purity" in result.output and "elude" in result.output
    assert json.loads(out.read_text())["accuracy"]["rewritten_logits_bitwise_equal"] is True


@pytest.mark.parametrize("args, message", [
    (["--plan", "does-not-exist.safetensors"], "plan not found"),
    (["--data", "no/such/folder"], "data not found"),
    (["--data", "embedded:nosuchsplit"], "unknown concept split"),
    (["--layers", "blocks.9.mlp"], "plan has no layer"),
    (["--data", "UNLABELLED"], "has no labels"),
])
def test_cli_evaluate_bad_inputs_are_one_line_errors(small_run, tmp_path, args, message):
    _, _, checkpoint, plan_path = small_run
    if "UNLABELLED" in args:
        unlabelled = tmp_path / "images.npy"
        np.save(unlabelled, np.zeros((4, 32, 32, 3), dtype=np.uint8))
        args = ["--data", str(unlabelled)]
    base = ["evaluate", "--plan", str(plan_path), "--checkpoint", str(checkpoint), "--no-sae", "--device", "cpu"]
    result = _invoke(base + args)
    assert result.exit_code == 2
    assert result.output.startswith("error:") and message in result.output
    assert "Traceback" not in result.output


def test_cli_evaluate_needs_sae_data_for_unknown_sets(small_run, tmp_path):
    _, _, checkpoint, plan_path = small_run
    labelled = tmp_path / "set.npz"
    np.savez(labelled, images=np.zeros((4, 32, 32, 3), dtype=np.uint8), labels=np.arange(4))
    result = _invoke(["evaluate", "--plan", str(plan_path), "--checkpoint", str(checkpoint), "--data", str(labelled)])
    assert result.exit_code == 2 and "--sae-data" in result.output


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_evaluation_json_is_atomic_strict_and_has_the_usual_mode(tmp_path, umask_022):
    accuracy = {"original": 0.5, "rewritten_max_abs_logit_diff": math.nan}
    result = EvalResult("d", 4, 2, "m", "context", "logits", accuracy, [], {"top_n": 2}, {})
    out = write_json(result, tmp_path / "eval.json")
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # 0o666 & ~umask, not mkstemp's 0o600
    saved = json.loads(out.read_text())
    assert saved["accuracy"]["rewritten_max_abs_logit_diff"] is None  # NaN is written as null
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temp file left behind
    with pytest.raises(DataError, match="does not exist"):
        write_json(result, tmp_path / "missing" / "eval.json")
    with pytest.raises(DataError, match="is a directory"):
        write_json(result, tmp_path)
