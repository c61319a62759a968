"""`--ray`: shards mapped over a local Ray cluster give the single-process plan (skipped without Ray)."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from elude_export.data.sources import open_source  # noqa: E402
from elude_export.fitting.fit import FitConfig, fit  # noqa: E402
from elude_export.fitting.parts import merge_parts  # noqa: E402
from elude_export.fitting.ray_runner import calibrate_on_ray  # noqa: E402
from elude_export.fitting.sharded import ModelRef  # noqa: E402
from elude_export.models import load_model  # noqa: E402

TINY = dict(limit=64, batch_size=16, top_m=16, k_max=2, n_init=1, stats_images=16, layers=["blocks.2.mlp"])


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_shards_give_the_single_process_plan(local_cluster) -> None:
    loaded, calib = load_model("embedded"), open_source("embedded:calib")
    config = FitConfig(**TINY)
    parts = calibrate_on_ray(ModelRef("embedded"), "embedded:calib", config, shards=2)
    assert sorted(part.shard.index for part in parts) == [0, 1]
    merged = merge_parts(parts)
    sharded = fit(loaded, calib, config, activations=merged.activations)
    assert sharded.plan.fingerprint() == fit(loaded, calib, config).plan.fingerprint()
