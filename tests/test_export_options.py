"""`ExportOptions`: one value for how a graph is exported, recorded in and read back from `elude.export`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from elude_export.errors import ExportError
from elude_export.export.contract import OnnxContract, read_contract
from elude_export.export.onnx_export import export_onnx
from elude_export.export.options import ExportOptions

from test_onnx_export import embedded_model_and_plan


def test_defaults_round_trip_and_are_frozen():
    options = ExportOptions()
    assert (options.mode, options.low_rank, options.steer_layout, options.opset, options.exporter) == \
        ("fused", True, "shared", 18, "auto")
    custom = ExportOptions(mode="explicit", low_rank=False, steer_layout="per_image", opset=20, exporter="dynamo")
    assert ExportOptions.from_json(custom.to_json()) == custom
    assert ExportOptions.from_json(None) == options  # files written before `elude.export` existed
    assert ExportOptions.from_json('{"mode": "fused", "low_rank": true, "steer_layout": "shared"}') == options
    with pytest.raises(AttributeError):
        options.mode = "explicit"  # type: ignore[misc]


@pytest.mark.parametrize("text, message", [
    ('{"mode": "sparse"}', "unknown mode 'sparse'"),
    ('{"steer_layout": "per_token"}', "unknown steer layout 'per_token'"),
    ('{"exporter": "tvm"}', "unknown exporter 'tvm'"),
    ('{"opset": 12}', "opset 12 is not supported"),
    ('{"opset": "18"}', "opset '18' is not supported"),
    ('{"low_rank": "yes"}', "low_rank must be true or false"),
    ('{"colour": "blue"}', "unknown export option(s) colour"),
    ('["fused"]', "must be a JSON object"),
    ("{not json", "not JSON"),
])
def test_bad_values_are_clear_errors(text, message):
    with pytest.raises(ExportError) as caught:
        ExportOptions.from_json(text)
    assert message in str(caught.value)


def test_contract_parses_export_options_and_refuses_bad_ones():
    contract = OnnxContract(model_name="m", model_fingerprint="f", plan_fingerprint="p", input={}, outputs=["logits"],
                            router="context", layers=[], taps=[],
                            export=ExportOptions(steer_layout="per_image", exporter="dynamo"))
    props = contract.to_metadata_props()
    assert json.loads(props["elude.export"])["steer_layout"] == "per_image"
    assert OnnxContract.from_metadata_props(props).export == contract.export
    del props["elude.export"]
    assert OnnxContract.from_metadata_props(props).export == ExportOptions()
    props["elude.export"] = '{"mode": "sparse"}'
    with pytest.raises(ValueError, match="unknown mode 'sparse'"):
        OnnxContract.from_metadata_props(props)


def test_export_records_what_it_used(tmp_path, monkeypatch):
    import elude_export.export.onnx_export as onnx_export

    def no_dynamo(*_args, **_kwargs):
        raise RuntimeError("torch.export cannot trace this")  # auto falls back: quick, and a resolved choice

    monkeypatch.setattr(onnx_export, "_run_dynamo", no_dynamo)
    loaded, plan = embedded_model_and_plan(router="context", rank=None)  # no low-rank factors in this plan
    path = export_onnx(loaded, plan, tmp_path / "m.onnx", taps=f"{plan.layers[0].path}:max",
                       options=ExportOptions(exporter="auto", low_rank=True, opset=18))
    recorded = read_contract(path).export
    assert recorded.exporter == "torchscript" == read_contract(path).versions["exporter"]  # what ran, not "auto"
    assert recorded.low_rank is False  # asked for, but the plan had no factors to use
    assert (recorded.mode, recorded.steer_layout, recorded.opset) == ("fused", "shared", 18)


def test_bad_options_fail_before_any_work(tmp_path):
    loaded, plan = embedded_model_and_plan()
    with pytest.raises(ExportError, match="unknown mode"):
        export_onnx(loaded, plan, tmp_path / "m.onnx", options=ExportOptions(mode="sparse"))
    assert list(tmp_path.iterdir()) == []


def test_options_module_is_torch_free():
    code = ("import sys, elude_export.export.options, elude_export.export.contract; "
            "print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
