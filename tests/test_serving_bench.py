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
