"""`validate` checks the graph interface first: tampered files fail with a typed error, and the CLI says why."""

from __future__ import annotations

import copy
import dataclasses

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from elude_export.cli import main
from elude_export.errors import ValidationError
from elude_export.export.contract import read_contract
from elude_export.export.interface import (
    DynamicAxisError,
    InputNamesError,
    InterfaceError,
    OutputNamesError,
    ShapeError,
    check_interface,
)
from elude_export.export.options import ExportOptions
from elude_export.export.validate import ValueMismatchError, validate_export

from test_validate import setup as exported  # noqa: F401  (a fixture: the torchscript export validate tests use)


@pytest.fixture(scope="module")
def setup(exported):  # noqa: F811
    """(model, plan, export, plan file, weights file): what `elude validate` needs on the command line."""
    from safetensors.torch import save_file

    loaded, plan, path, folder = exported
    weights = folder / "interface-weights.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(weights))
    return loaded, plan, path, plan.save(folder / "interface-plan.safetensors"), weights


def tampered(path, target, change) -> str:
    model = onnx.load(str(path))
    change(model.graph)
    onnx.save(model, str(target))
    return str(target)


def add_extra_output(graph) -> None:
    """A debugging leftover: a copy of the logits as a graph output the contract does not name."""
    graph.node.append(helper.make_node("Identity", ["logits"], ["debug.logits"]))
    extra = copy.deepcopy(graph.output[0])
    extra.name = "debug.logits"
    graph.output.append(extra)


def rename_batch_axis(graph) -> None:
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "batch":
                dim.dim_param = "N"


def validate_cli(setup, onnx_path: str):
    _, _, _, plan_path, weights = setup
    return CliRunner().invoke(main, ["validate", "embedded", "--checkpoint", str(weights), "--plan", str(plan_path),
                                     "--onnx", onnx_path, "--data", "none", "--random", "2", "--provider", "cpu"])


def assert_one_error_line(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_a_genuine_export_passes_the_interface_check(setup):
    _, _, path, _, _ = setup
    check_interface(path, read_contract(path))


def drop_last_output(graph) -> None:
    graph.output.pop()


@pytest.mark.parametrize("change, error, message", [
    (add_extra_output, OutputNamesError, "has outputs its metadata does not name: debug.logits"),
    (drop_last_output, OutputNamesError, "lacks outputs its metadata names: tap."),
    (rename_batch_axis, DynamicAxisError, "the first axis of 'input' is named 'N', expected the dynamic axis 'batch'"),
])
def test_tampered_interface_is_a_typed_error_and_one_cli_line(setup, tmp_path, change, error, message):
    loaded, plan, path, _, _ = setup
    target = tampered(path, tmp_path / "tampered.onnx", change)
    with pytest.raises(error) as caught:
        validate_export(loaded, plan, target, None, provider="cpu", n_random=2)
    assert message in str(caught.value)
    assert_one_error_line(validate_cli(setup, target), message)


def test_per_image_steer_axis_is_checked(setup):
    _, _, path, _, _ = setup
    contract = read_contract(path)  # shared steers, (n_subunits,): wrong for a per-image contract
    per_image = dataclasses.replace(contract, export=ExportOptions(steer_layout="per_image", exporter="dynamo"))
    with pytest.raises(DynamicAxisError, match="per-image steer .* expected the dynamic axis 'steer_batch'"):
        check_interface(path, per_image)


def test_sizes_and_inputs_are_checked(setup, tmp_path):
    _, _, path, _, _ = setup
    contract = read_contract(path)
    wider = dataclasses.replace(contract, input={**contract.input, "width": contract.input["width"] + 1})
    with pytest.raises(ShapeError, match="preprocessing spec"):
        check_interface(path, wider)
    layer = contract.layers[0]
    fewer = dataclasses.replace(contract, layers=[dataclasses.replace(layer, n_subunits=layer.n_subunits - 1),
                                                  *contract.layers[1:]])
    with pytest.raises(ShapeError, match="sub-units"):
        check_interface(path, fewer)
    extra_input = tampered(path, tmp_path / "input.onnx", lambda graph: graph.input.append(
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 4])))
    with pytest.raises(InputNamesError, match="inputs its metadata does not name: mask"):
        check_interface(extra_input, contract)


def test_error_types_are_validation_errors():
    for error in (OutputNamesError, InputNamesError, DynamicAxisError, ShapeError):
        assert issubclass(error, InterfaceError) and issubclass(error, ValidationError)
    assert issubclass(ValueMismatchError, ValidationError) and not issubclass(ValueMismatchError, InterfaceError)


def test_value_mismatch_is_its_own_error_line(setup):
    result = CliRunner().invoke(main, [*validate_args(setup), "--atol", "0", "--rtol", "0", "--no-steering"])
    assert_one_error_line(result, "differs from the PyTorch model beyond tolerance")
    assert "✗" in result.output


def validate_args(setup) -> list[str]:
    _, _, path, plan_path, weights = setup
    return ["validate", "embedded", "--checkpoint", str(weights), "--plan", str(plan_path), "--onnx", str(path),
            "--data", "none", "--random", "4", "--provider", "cpu"]
