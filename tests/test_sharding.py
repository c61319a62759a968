"""Sharded calibration merges exactly: 2 and 4 shards give the single-process plan, bit for bit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from elude_export.cli import main
from elude_export.data.sources import open_source
from elude_export.fitting.calibrate import collect_activations, top_m_merge
from elude_export.fitting.fit import FitConfig, fit
from elude_export.fitting.parts import load_part, merge_parts
from elude_export.fitting.sharded import calibrate_shard
from elude_export.fitting.shards import Shard, ShardError, parse_shard
from elude_export.layers import find_layers
from elude_export.models import load_model

# tiny: 5 batches of 16 images, two layers, light clustering
TINY = dict(limit=80, batch_size=16, top_m=16, k_max=2, n_init=1, stats_images=32,
            layers=["blocks.1.mlp", "blocks.3.mlp"])


@pytest.fixture(scope="module")
def embedded():
    """The embedded model and its calibration images."""
    return load_model("embedded"), open_source("embedded:calib")


@pytest.fixture(scope="module")
def single(embedded):
    return fit(*embedded, FitConfig(**TINY))


def _sharded_plan(loaded, calib, shards: int, config: FitConfig):
    parts = [calibrate_shard(loaded, calib, "embedded:calib", config, Shard(i, shards)) for i in range(shards)]
    merged = merge_parts(list(reversed(parts)))  # order of the parts does not matter
    return fit(loaded, calib, config, activations=merged.activations)


@pytest.mark.parametrize("shards", [2, 4])
def test_shards_merge_to_the_single_process_plan(embedded, single, shards) -> None:
    loaded, calib = embedded
    sharded = _sharded_plan(loaded, calib, shards, FitConfig(**TINY))
    assert sharded.n_images == single.n_images == 80
    assert sharded.plan.fingerprint() == single.plan.fingerprint()


def test_token_router_shards_merge_exactly(embedded) -> None:
    loaded, calib = embedded
    config = FitConfig(**{**TINY, "router": "token", "layers": ["blocks.2.mlp"]})
    assert _sharded_plan(loaded, calib, 2, config).plan.fingerprint() == fit(loaded, calib, config).plan.fingerprint()


def test_shards_fall_on_batch_boundaries_and_cover_everything() -> None:
    ranges = [Shard(i, 4).image_range(1000, 64) for i in range(4)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:]))
    assert all(start % 64 == 0 for start, _ in ranges)


@pytest.mark.parametrize("spec", ["3", "4/4", "-1/2", "a/b", "1/0"])
def test_bad_shard_specs_are_user_errors(spec) -> None:
    with pytest.raises(ShardError, match="bad shard"):
        parse_shard(spec)


def test_top_m_merge_breaks_ties_by_image_id() -> None:
    values = torch.tensor([[1.0], [2.0], [1.0], [1.0]])
    images = torch.tensor([[7], [3], [5], [1]])
    kept, ids, _ = top_m_merge(values, images, None, 3)
    assert ids.flatten().tolist() == [3, 1, 5] and kept.flatten().tolist() == [2.0, 1.0, 1.0]


def test_calibration_stops_after_the_last_target_layer(embedded) -> None:
    """Blocks after the last target layer never run (their forward is cut short)."""
    loaded, calib = embedded
    ran = []
    handle = loaded.model.blocks[3].register_forward_pre_hook(lambda *_: ran.append(1))
    try:
        layers = find_layers(loaded.model, ["blocks.1.mlp"])
        collect_activations(loaded.model, layers, calib, loaded.input_spec, limit=16, batch_size=8)
    finally:
        handle.remove()
    assert ran == []


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_cli_calibrate_and_fit_from_parts(tmp_path: Path, single) -> None:
    common = ["--limit", "80", "--batch-size", "32",  # 3 batches: shards of 1 and 2 batches
              "--top-m", "16", "--layers", "blocks.1.mlp,blocks.3.mlp",
              "--device", "cpu"]
    for i in range(2):
        result = _cli("calibrate", "embedded", *common, "--shard", f"{i}/2", "-o", str(tmp_path / f"part_{i}.st"),
                      "--quiet")
        assert result.exit_code == 0, result.output
    part = load_part(tmp_path / "part_1.st")
    assert part.image_range == (32, 80) and part.activations["blocks.1.mlp"].top_images.min() >= 32
    plan = tmp_path / "plan.safetensors"
    result = _cli("fit", "embedded", "--from-parts", str(tmp_path / "part_0.st"), str(tmp_path / "part_1.st"),
                  "--k-max", "2", "-o", str(plan), "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "peak rss" in result.output

    missing = _cli("fit", "embedded", "--from-parts", str(tmp_path / "part_0.st"), "-o", str(plan))
    assert missing.exit_code == 2 and "missing shard(s) 1/2" in missing.output
    overlap = _cli("fit", "embedded", "--from-parts", str(tmp_path / "part_0.st"), str(tmp_path / "part_0.st"),
                   "-o", str(plan))
    assert overlap.exit_code == 2 and "overlapping parts" in overlap.output
    other = _cli("fit", "embedded-digits", "--from-parts", str(tmp_path / "part_0.st"), str(tmp_path / "part_1.st"),
                 "-o", str(plan))
    assert other.exit_code == 2 and "another model" in other.output
    bad = _cli("calibrate", "embedded", "--shard", "2/2", "-o", str(tmp_path / "x.st"))
    assert bad.exit_code == 2 and "error: bad shard '2/2'" in bad.output


def test_parts_with_other_settings_are_refused(embedded) -> None:
    loaded, calib = embedded
    config = FitConfig(**TINY)
    first = calibrate_shard(loaded, calib, "embedded:calib", config, Shard(0, 2))
    second = calibrate_shard(loaded, calib, "embedded:calib", replace(config, top_m=8), Shard(1, 2))
    with pytest.raises(ShardError, match="a has other settings than b: top_m=16 vs 8"):
        merge_parts([second, first], ["b", "a"])
