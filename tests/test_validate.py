"""`validate`: PyTorch vs onnxruntime report, providers, tolerances, the CLI, the GPU path."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from elude_export.cli import main
from elude_export.errors import ValidationError
from elude_export.models import EMBEDDED_WEIGHTS
from elude_export.export.onnx_export import export_onnx
from elude_export.data.sources import ArraySource, open_source
from elude_export.export.options import ExportOptions
from elude_export.export.ort_session import choose_providers
from elude_export.export.validate import validate_export

from test_onnx_export import embedded_model_and_plan


def held_out_source(loaded):
    if EMBEDDED_WEIGHTS.is_file():
        return open_source("embedded:test")
    images = np.random.default_rng(2).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    return ArraySource("random-held-out", 64, images=images)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    loaded, plan = embedded_model_and_plan()
    folder = tmp_path_factory.mktemp("validate")
    path = export_onnx(loaded, plan, folder / "model.onnx", taps="all:max,cls",
                       options=ExportOptions(exporter="torchscript"))
    return loaded, plan, path, folder


def test_report_passes_and_names_provider(setup):
    loaded, plan, path, _ = setup
    report = validate_export(loaded, plan, path, held_out_source(loaded), provider="cpu", n_images=32, n_random=4)
    assert report.ok, "\n".join(report.lines())
    assert report.provider == "CPUExecutionProvider" and report.n_images == 32 and report.n_random == 4
    logits = report.outputs[0]
    assert logits.name == "logits" and logits.shape == (36, 4) and logits.top1_agreement == 1.0
    assert logits.max_abs <= 1e-5
    assert {c.name for c in report.taps} == {f"tap.{l.path}.{p}" for l in plan.layers for p in ("max", "cls")}
    assert report.steered_subunit is not None and report.steer_effect > 0
    assert report.steering and all(c.ok for c in report.steering)
    text = "\n".join(report.lines())
    assert "✓ logits" in text and "result: OK" in text
    parsed = json.loads(report.to_json())
    assert parsed["ok"] is True and parsed["provider"] == "CPUExecutionProvider"
    assert parsed["outputs"][0]["name"] == "logits"


def test_auto_provider_reports_what_ran(setup):
    loaded, plan, path, _ = setup
    report = validate_export(loaded, plan, path, None, provider="auto", n_random=2, check_steering=False)
    expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPUExecutionProvider"
    assert report.provider == expected and report.ok


def test_cuda_request_without_cuda_is_a_clear_error():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ValidationError, match="no CUDAExecutionProvider"):
        choose_providers("cuda", ValidationError)


def test_zero_tolerance_fails_with_cross_marks(setup):
    loaded, plan, path, _ = setup
    report = validate_export(loaded, plan, path, held_out_source(loaded), provider="cpu", n_images=16, n_random=0,
                             atol=0.0, rtol=0.0, check_steering=False)
    # onnxruntime re-associates sums: bitwise equality everywhere is not expected
    assert not report.ok and any(line.lstrip().startswith("✗") for line in report.lines())


def test_export_of_another_plan_is_refused(setup, tmp_path):
    loaded, plan, path, _ = setup
    other_plan = copy.deepcopy(plan)
    other_plan.fit_config = {**other_plan.fit_config, "seed": 99}  # same weights, a different plan
    with pytest.raises(ValidationError, match="another plan"):
        validate_export(loaded, other_plan, path, None, n_random=1)


def test_corrupt_onnx_is_refused(setup, tmp_path):
    loaded, plan, path, _ = setup
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValidationError):
        validate_export(loaded, plan, broken, None, n_random=1)


def test_cli_validate_writes_json_and_exit_codes(setup, tmp_path):
    from safetensors.torch import save_file

    loaded, plan, path, folder = setup
    weights = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(weights))
    plan_path = plan.save(folder / "plan.safetensors")
    data = "embedded:test" if EMBEDDED_WEIGHTS.is_file() else "none"
    report_path = tmp_path / "report.json"
    common = ["validate", "embedded", "--checkpoint", str(weights), "--plan", str(plan_path), "--onnx", str(path),
              "--data", data, "--limit", "16", "--provider", "cpu"]
    result = CliRunner().invoke(main, common + ["--report", str(report_path)])
    assert result.exit_code == 0, result.output
    assert "✓ logits" in result.output and "CPUExecutionProvider" in result.output
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["taps"] and report["steering"]["comparisons"]
    result = CliRunner().invoke(main, common + ["--atol", "0", "--rtol", "0", "--no-steering"])
    assert result.exit_code == 2 and "✗" in result.output and "error:" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["validate", "embedded", "--checkpoint", str(weights), "--plan", str(plan_path),
                                       "--onnx", str(tmp_path / "missing.onnx"), "--data", "none"])
    assert result.exit_code == 2 and "ONNX model not found" in result.output


@pytest.mark.gpu
def test_cuda_provider_validates(setup):
    """Untested in development (no GPU there): needs onnxruntime-gpu (the `gpu` extra) and a CUDA device."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without CUDAExecutionProvider (pip install 'elude-export[gpu]')")
    loaded, plan, path, _ = setup
    report = validate_export(loaded, plan, path, held_out_source(loaded), provider="cuda", n_images=32)
    assert report.provider == "CUDAExecutionProvider"
    assert report.ok, "\n".join(report.lines())
    assert torch.cuda.is_available()


def test_near_tie_routes_are_found_and_only_they_are_left_out(setup):
    """Two identical routing rows make a unit's route a tie on every image; nothing else is a tie."""
    from elude_export.export.contract import read_contract
    from elude_export.rewrite import apply_plan, disentangled_layers
    from elude_export.export.validate import _without_ties, route_ties

    loaded, plan, path, _ = setup
    tied = copy.deepcopy(plan)
    layer = tied.layers[0]
    layer.router_a = layer.router_b = None
    layer.router[0, 1:] = layer.router[0, 0]  # every sub-unit of the first split unit scores alike
    unit = int(layer.split_units[0])
    model = apply_plan(loaded.model, tied, layers=[layer.path], poolings=())
    router = disentangled_layers(model)[layer.path].router
    x = torch.randn(4, 3, 32, 32)
    captured = {}
    hook = disentangled_layers(model)[layer.path].register_forward_pre_hook(
        lambda _m, args: captured.update(x=args[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    ties = route_ties(router, captured["x"]).numpy()
    assert ties[:, unit].all() and ties.sum() < ties.size // 10
    contract = read_contract(path)
    tap = next(t for t in contract.taps if t.layer == layer.path and t.pooling == "max")
    info = contract.layer(layer.path)
    reference = np.random.default_rng(0).random((4, info.n_subunits)).astype(np.float32)
    candidate = reference.copy()
    sibling_columns = [c for c, u in enumerate(info.unit) if u == unit]
    candidate[:, sibling_columns] = candidate[:, sibling_columns[::-1]]  # the flip a tie allows
    ref, cand, excluded = _without_ties(tap, contract, {layer.path: ties}, reference, candidate)
    assert np.array_equal(ref, cand) and excluded >= 4 * len(sibling_columns)
    candidate[:, 0 if unit != info.unit[0] else -1] += 1.0  # a difference elsewhere stays visible
    ref, cand, _ = _without_ties(tap, contract, {layer.path: ties}, reference, candidate)
    assert not np.array_equal(ref, cand)


def test_validation_that_proves_too_little_fails(setup):
    """Too many near-tie exclusions, or a steering check that could not run, fail unless allowed."""
    loaded, plan, path, _ = setup
    report = validate_export(loaded, plan, path, None, provider="cpu", n_random=4)
    assert report.ok and report.steering, "\n".join(report.lines())
    assert set(report.tie_shares) == {tap.name for tap in report.taps}
    tied = copy.copy(report)
    tied.tie_shares = {**report.tie_shares, report.taps[0].name: 0.2}
    assert not tied.ok and "above the bound 5.0%" in "\n".join(tied.lines())
    tied.max_tie_share = 0.25
    assert tied.ok
    unsteered = copy.copy(report)
    unsteered.steering = []
    assert not unsteered.ok and "✗ steering not checked" in "\n".join(unsteered.lines())
    unsteered.steering_required = False  # --no-steering: skipped on purpose
    assert unsteered.ok


def test_steer_candidate_is_one_that_fires_on_the_inputs(setup):
    from elude_export.export.validate import _pick_steer_target, load_checked_contract

    loaded, plan, path, _ = setup
    contract = load_checked_contract(path, loaded, plan)
    layer = contract.layers[0]
    tap = next(t for t in contract.taps if t.layer == layer.path)
    counts = np.bincount(np.asarray(layer.unit), minlength=layer.n_units)
    split = [c for c, unit in enumerate(layer.unit) if counts[unit] > 1]
    observed = np.zeros((3, layer.n_subunits), dtype=np.float32)
    observed[1, split[-1]] = 5.0  # only the last split sub-unit fired on these inputs
    candidates = _pick_steer_target(contract, {tap.output: observed})
    assert [c for p, c in candidates if p == layer.path] == [split[-1]]
