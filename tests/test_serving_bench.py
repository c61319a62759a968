"""The serving benchmark's soak verdict: flat after warm-up passes, steady growth does not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serving.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serving", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_warm_up_jump_then_flat_is_flat(bench):
    samples = [(t, 120.0 if t < 3 else 166.0 + 0.1 * (t % 2)) for t in range(300)]
    verdict = bench.rss_verdict(samples)
    assert verdict["flat"] and verdict["warm_up_s"] == pytest.approx(29.9)  # a tenth of the run
    assert verdict["start"] == 120.0 and abs(verdict["growth"]) < 0.2


def test_steady_growth_is_not_flat(bench):
    samples = [(t, 150.0 + 0.05 * t) for t in range(300)]  # 3 MB/min: 13.5 MB over the settled run
    verdict = bench.rss_verdict(samples)
    assert not verdict["flat"]
    assert verdict["slope_mb_per_min"] == pytest.approx(3.0)
    assert verdict["growth"] > 5


def test_direct_baseline_from_several_threads_counts_every_run(bench, tmp_path):
    from serving_fixtures import build_fixture_model, sample_inputs
    import numpy as np

    path = build_fixture_model(tmp_path / "fixture.onnx").path
    x = sample_inputs(8, np.random.default_rng(0))
    one = bench.bench_direct(path, x, 0.3, spinning=False, threads=1)
    two = bench.bench_direct(path, x, 0.3, spinning=False, threads=1, callers=2)
    for result in (one, two):
        assert result["images"] == 8 * len(result["latencies"]) > 0 and result["errors"] == 0
    assert 0.3 <= two["elapsed"] < 5  # wall time of the two threads together, not the sum of their runs
    assert {"images", "elapsed", "latencies", "errors", "cpu"} <= set(two) and two["cpu"] > 0
