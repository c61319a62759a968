"""The baseline protocol: the built-in families, the registry, and a new family defined in this file alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elude_export.evidence.baselines import (
    ELUDE, UNITS, Baseline, Columns, SharedForward, SubunitBaseline, delta_key, register_baseline, registered,
    registered_baselines, unregister_baseline,
)
from elude_export.evidence.baselines.base import image_max, unit_columns
from elude_export.evidence.evaluate import EvalConfig, evaluate
from elude_export.evidence.report import summary_plots
from elude_export.data.sources import open_source
from elude_export.plan import LayerPlan
from plan_factory import small_fitted_plan

pytestmark = pytest.mark.usefixtures("one_thread")

FIRST_K = 8


class FirstUnits(Baseline):
    """A toy family: the layer's first FIRST_K units, as they are (a subset of the units)."""

    name = "firstk"
    color = "#aa3377"

    def observe(self, forward: SharedForward) -> dict[str, torch.Tensor]:
        return {path: image_max(forward.hidden[path])[:, :FIRST_K] for path in self.setup.layers}

    def columns(self, layer: LayerPlan) -> Columns:
        return unit_columns(layer, np.arange(FIRST_K))


class FlippedControl(SubunitBaseline):
    """A toy control: ELUDe's sub-unit activations credited to the batch's images in reverse order."""

    name = "flipped"
    description = "ELUDe's taps with the images of each batch reversed"
    is_control = True

    def observe(self, forward: SharedForward) -> dict[str, torch.Tensor]:
        return {path: taps.flip(0) for path, taps in forward.taps.items()}


def test_builtin_families_are_registered_in_report_order_with_their_flags():
    kinds = registered_baselines()
    assert list(kinds) == [UNITS, ELUDE, "random", "shuffle", "global", "sae"]
    assert [name for name, kind in kinds.items() if kind.is_control] == ["random", "shuffle", "global"]
    assert [name for name, kind in kinds.items() if not kind.paired_with_units] == ["sae"]
    assert [name for name, kind in kinds.items() if not kind.has_split_scope] == ["sae"]
    assert [name for name, kind in kinds.items() if kind.splits_units] == [ELUDE, "random", "shuffle", "global"]
    assert len({kind.color for kind in kinds.values()}) == len(kinds)


def test_registry_rejects_bad_classes_and_context_manager_cleans_up():
    with pytest.raises(ValueError, match="already registered"):
        register_baseline(type("Again", (FirstUnits,), {"name": UNITS}))
    with pytest.raises(TypeError, match="not a concrete"):
        register_baseline(SubunitBaseline)  # abstract: no observe()
    with pytest.raises(TypeError, match="has no name"):
        register_baseline(type("Nameless", (FirstUnits,), {"name": ""}))
    with pytest.raises(ValueError, match="overwrite a layer field"):
        register_baseline(type("Clash", (FirstUnits,), {"name": "clash", "info_key": "summary"}))
    with pytest.raises(KeyError, match="no baseline named"):
        unregister_baseline("never-registered")
    before = registered_baselines()
    with pytest.raises(RuntimeError, match="inside"):
        with registered(FirstUnits):
            assert list(registered_baselines())[-1] == "firstk"
            raise RuntimeError("inside")
    assert registered_baselines() == before


@pytest.fixture(scope="module")
def extended_result():
    """An evaluation with two families registered only for its duration (no SAE, to stay quick)."""
    loaded, plan = small_fitted_plan(seed=0, layer="blocks.1.mlp", k_max=2)
    before = registered_baselines()
    with registered(FirstUnits), registered(FlippedControl):
        result = evaluate(loaded, plan, open_source("embedded:test"),
                          EvalConfig(top_n=4, limit=64, bootstrap=20, sae=False))
    assert registered_baselines() == before, "test families must not leak into other tests"
    return plan, result


def test_a_new_family_shows_up_in_columns_summary_json_and_table(extended_result):
    plan, result = extended_result
    (layer,) = result.layers
    # switched-off SAE and the global control without fit data: no columns
    assert list(layer.columns) == [UNITS, ELUDE, "random", "shuffle", "firstk", "flipped"]
    units, first = layer.columns[UNITS], layer.columns["firstk"]
    assert first.n_columns == FIRST_K and first.names == units.names[:FIRST_K]
    np.testing.assert_array_equal(first.values, units.values[:, :FIRST_K])  # the same columns, so the same tops
    np.testing.assert_array_equal(first.metrics["label_purity"], units.metrics["label_purity"][:FIRST_K])
    rows = {(row["method"], row["scope"]): row for row in layer.summary}
    assert {("firstk", "all"), ("firstk", "split"), ("flipped", "all"), ("flipped", "split")} <= set(rows)
    assert rows[("firstk", "all")]["columns"] == FIRST_K
    assert rows[("firstk", "all")][delta_key(UNITS)]["label_purity"]["delta"] is not None
    assert delta_key("flipped") in rows[(ELUDE, "all")]  # a control is compared with ELUDe ...
    assert delta_key("firstk") not in rows[(ELUDE, "all")]  # ... a non-control is not
    assert "flipped" in layer.route_balance and "firstk" not in layer.route_balance
    assert layer.columns["flipped"].n_columns == plan.layers[0].n_subunits
    saved = result.to_json()["layers"][0]
    assert {row["method"] for row in saved["summary"]} >= {"firstk", "flipped"}
    assert saved["sae"] is None  # the switched-off SAE still says so
    text = result.table()
    assert "\n  firstk  all " in text and "\n  flipped split" in text
    assert "elude - flipped:" in text and "flipped = ELUDe's taps with the images of each batch reversed" in text
    assert set(summary_plots(result)) == {"k_distribution", "purity_histograms"}


def test_global_control_is_one_image_clustering_shared_by_units_with_the_same_k():
    """Two units with the same K_j route every image alike: the partition does not know the unit."""
    from elude_export.evidence.baselines.global_cluster import GlobalClusterBaseline
    from elude_export.evidence.collect import collect
    from elude_export.evidence.evaluate import make_setup

    loaded, plan = small_fitted_plan(seed=0, layer="blocks.1.mlp", k_max=3)
    config = EvalConfig(top_n=4, limit=64, sae=False, sae_limit=96)
    setup = make_setup(loaded, plan, config, open_source("embedded:calib"), torch.device("cpu"), lambda _m: None)
    control = GlobalClusterBaseline(setup)
    control.fit()
    layer = plan.layers[0]
    assert set(control.centroids[layer.path]) == {3}  # fixed K = 3: one clustering
    route = control.routes(control.image_contexts(open_source("embedded:test").subset(np.arange(48))))[layer.path]
    split = layer.split_units.tolist()
    assert (route[:, split] == route[:, split[:1]]).all()  # the same partition for every unit
    assert len(route[:, split[0]].unique()) >= 2  # and it does split the images
    collected = collect(setup, open_source("embedded:test"), {"global": control})
    assert collected.tops["global"][layer.path].values.shape[1] == layer.n_subunits
