"""Fitting on the embedded trained model: deterministic, sane K, consistent monitoring baselines."""

from __future__ import annotations

import pytest
import torch

from elude_export.fitting.fit import FitConfig, fit
from elude_export.models import load_model
from elude_export.data.sources import open_source


@pytest.fixture(scope="module")
def loaded():
    return load_model("embedded")


@pytest.fixture(scope="module")
def calib():
    return open_source("embedded:calib")


# light settings: these tests check properties of any fit, not the default's quality
LIGHT = dict(limit=512, top_m=64, k_max=3, n_init=1, stats_images=512)


@pytest.fixture(scope="module")
def report(loaded, calib):
    return fit(loaded, calib, FitConfig(**LIGHT))


def test_fit_is_deterministic(loaded, calib, report) -> None:
    again = fit(loaded, calib, FitConfig(**LIGHT))
    assert again.plan.fingerprint() == report.plan.fingerprint()


def test_k_choice_and_router_shapes(report) -> None:
    for layer in report.plan.layers:
        assert 1 <= int(layer.k.min()) and int(layer.k.max()) <= 3
        assert layer.split_units.numel() == int((layer.k > 1).sum())
        assert layer.router.shape == (layer.split_units.numel(), layer.k_max, 96)
        padded = ~layer.router_valid
        assert torch.all(layer.router[padded] == 0)
    assert sum(layer.split_units.numel() for layer in report.plan.layers) > 0, "a trained model has splittable units"


def test_statistics_are_a_consistent_baseline(report) -> None:
    quantile = FitConfig().threshold_quantile
    for layer in report.plan.layers:
        stats = layer.stats
        parent, _ = layer.columns()
        assert stats["threshold"].shape == (layer.n_units,)
        assert torch.all((stats["fire_rate"] >= 0) & (stats["fire_rate"] <= 1))
        # context routing gives each image's unit value to exactly one sub-unit, so a unit's
        # sub-unit firing rates add up to the unit's rate of exceeding its own quantile threshold
        per_unit = torch.zeros(layer.n_units).index_add_(0, parent, stats["fire_rate"])
        assert torch.allclose(per_unit, torch.full_like(per_unit, 1 - quantile), atol=0.01)
        assert torch.all(stats["quantiles"].diff(dim=1) >= 0)
        assert torch.allclose(stats["bin_fraction"].sum(1), torch.ones(layer.n_subunits))


def test_statistics_from_calibration_equal_a_pass_of_the_rewritten_model(loaded, calib, report) -> None:
    """The fit derives the baselines from what calibration kept; one forward of the rewritten
    model over the same images must give exactly the same tensors."""
    from copy import deepcopy

    from elude_export.fitting.statistics import subunit_statistics

    assert report.seconds["statistics"] < report.seconds["calibrate"], "no second forward pass expected"
    forwarded = deepcopy(report.plan)
    subunit_statistics(loaded, forwarded, calib, FitConfig(**LIGHT), torch.device("cpu"), n_images=512)
    for fast, slow in zip(report.plan.layers, forwarded.layers):
        assert fast.stats.keys() == slow.stats.keys()
        for name in fast.stats:
            assert torch.equal(fast.stats[name], slow.stats[name]), (fast.path, name)


def test_parallel_chunk_workers_give_the_same_routers(loaded, calib) -> None:
    """Chunks run on one single-threaded worker per core; the plan must not depend on how many."""
    from elude_export.fitting.calibrate import collect_activations
    from elude_export.fitting.routers import fit_layer
    from elude_export.layers import find_layers

    layer = find_layers(loaded.model, ["blocks.2.mlp"])[0]
    acts = collect_activations(loaded.model, [layer], calib, loaded.input_spec, top_m=64, limit=256)[layer.path]
    config = FitConfig(**{**LIGHT, "unit_chunk": 48})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parallel = fit_layer(layer, acts, config, torch.device("cpu"))
        assert torch.get_num_threads() == 2, "the thread count is restored"
        torch.set_num_threads(1)
        serial = fit_layer(layer, acts, config, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(parallel.k, serial.k) and torch.equal(parallel.router, serial.router)


def test_low_rank_router_is_still_lossless(loaded, calib) -> None:
    from elude_export.rewrite.equality import check_rewrite

    ranked = fit(loaded, calib, FitConfig(limit=256, top_m=64, router_rank=16, stats_images=64, layers=["blocks.2.mlp"]))
    layer = ranked.plan.layers[0]
    assert layer.router_a.shape[1] == 16 and layer.router_b.shape == (16, 96)
    results = check_rewrite(loaded, ranked.plan, open_source("embedded:test"), n_images=64)
    assert all(result.ok for result in results), [r.line() for r in results]
    assert results[0].equal_fraction == 1.0
