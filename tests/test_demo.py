"""`elude demo`, the README's main job, end to end on the embedded model and data (offline)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from elude_export.cli import main


def test_demo_runs_the_whole_pipeline_and_every_check_passes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out-dir", str(out), "--quiet", "--check-images", "128"])
    assert result.exit_code == 0, result.output[-3000:]
    assert "demo finished" in result.output
    assert (out / "plan.safetensors").is_file() and (out / "model.onnx").is_file()
    validation = json.loads((out / "validation.json").read_text())
    assert validation["ok"] is True and validation["steering"]["subunit"]
    # the fused rewrite is bitwise: the equality line reports a max |Δ| of exactly 0
    fused = next(line for line in result.output.splitlines() if "fused output" in line)
    assert "max|Δ| 0.000e+00" in fused
    # labels on the fit images go into the ONNX, and the steering table uses them
    from elude_export.evidence.labels import load_labels
    from elude_export.export.contract import read_contract
    from elude_export.plan import load_plan

    plan = load_plan(out / "plan.safetensors")
    labels = load_labels(out / "labels.json", plan.fingerprint())
    carried = read_contract(out / "model.onnx").labels
    assert {n for layer in plan.layers for n in layer.subunit_names()} <= set(carried)
    assert all(carried[n].text == labels.labels[n].text for n in carried)
    selectivity = json.loads((out / "selectivity.json").read_text())
    assert len(selectivity["rows"]) == 32 and selectivity["images_per_concept"] == 16
    assert "median selectivity (margin, headline)" in result.output
