"""The graph interface an ELUDe contract promises, checked against the file before any value is.

Like Optimum's validation, names and axes are checked first, so a tampered or foreign file
fails with what is wrong with it rather than a confusing value mismatch, and stricter:
- outputs: exactly the contract's original outputs and taps (none missing, none extra);
- inputs: `input` plus the contract's steer inputs, each steer backed by a default initializer;
- batch axis: named `batch` on `input` and every output; per-image steers `steer_batch`;
- sizes: `input` is (batch, C, H, W) per `elude.input`; taps and steers end in n_subunits.
Torch-free (onnx protobuf only). Each failure kind is its own `ValidationError` subclass.
"""

from __future__ import annotations

from pathlib import Path

from elude_export.errors import ValidationError
from elude_export.export.contract import BATCH_DIM, INPUT_NAME, STEER_BATCH_DIM, OnnxContract
from elude_export.vocabulary import TOKEN_TAP


class InterfaceError(ValidationError):
    """The graph's inputs or outputs are not the ones its contract names."""


class OutputNamesError(InterfaceError):
    """An output the contract names is missing, or the graph has outputs the contract does not name."""


class InputNamesError(InterfaceError):
    """`input` or a steer input is missing, a steer has no default, or there are unexpected inputs."""


class DynamicAxisError(InterfaceError):
    """A batch axis is fixed or not named `batch` (`steer_batch` for per-image steers)."""


class ShapeError(InterfaceError):
    """A tensor's rank or fixed sizes disagree with the contract."""


Dims = list[int | str | None]  # a size, a symbolic axis name, or None when the graph leaves it open
Tensors = dict[str, Dims]  # graph inputs or outputs by name


def _dims(value) -> Dims:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


def check_interface(onnx_path: str | Path, contract: OnnxContract) -> None:
    """Raise the first interface failure of the file at `onnx_path` (its graph only, no weights)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = {value.name: _dims(value) for value in graph.input}
    outputs = {value.name: _dims(value) for value in graph.output}
    initializers = {init.name for init in graph.initializer}
    _check_names(onnx_path, contract, inputs, outputs, initializers)
    _check_batch_axes(onnx_path, contract, inputs, outputs)
    _check_sizes(onnx_path, contract, inputs, outputs)


def _check_names(path: str | Path, contract: OnnxContract, inputs: Tensors, outputs: Tensors,
                 initializers: set[str]) -> None:
    expected_outputs = contract.outputs + [tap.output for tap in contract.taps]
    missing = [name for name in expected_outputs if name not in outputs]
    if missing:
        raise OutputNamesError(f"{path} lacks outputs its metadata names: {', '.join(missing)}")
    extra = [name for name in outputs if name not in expected_outputs]
    if extra:
        raise OutputNamesError(f"{path} has outputs its metadata does not name: {', '.join(extra)} "
                               f"(expected exactly {', '.join(expected_outputs)})")
    steers = [layer.steer_input for layer in contract.layers if layer.steer_input]
    missing = [name for name in [INPUT_NAME, *steers] if name not in inputs]
    if missing:
        raise InputNamesError(f"{path} lacks inputs its metadata names: {', '.join(missing)}")
    extra = [name for name in inputs if name != INPUT_NAME and name not in steers and name not in initializers]
    if extra:
        raise InputNamesError(f"{path} has inputs its metadata does not name: {', '.join(extra)}")
    undefaulted = [name for name in steers if name not in initializers]
    if undefaulted:
        raise InputNamesError(f"{path}: steer input(s) without a default (ones) initializer: {', '.join(undefaulted)}")


def _check_batch_axes(path: str | Path, contract: OnnxContract, inputs: Tensors, outputs: Tensors) -> None:
    batched = {INPUT_NAME: inputs[INPUT_NAME], **outputs}
    for name, dims in batched.items():
        if not dims or dims[0] != BATCH_DIM:
            raise DynamicAxisError(f"{path}: the first axis of '{name}' is {_axis(dims)}, expected the dynamic "
                                   f"axis '{BATCH_DIM}'")
    if contract.export.steer_layout != "per_image":
        return
    for layer in contract.layers:
        dims = inputs.get(layer.steer_input) if layer.steer_input else None
        if dims is not None and (not dims or dims[0] != STEER_BATCH_DIM):
            raise DynamicAxisError(f"{path}: the first axis of per-image steer '{layer.steer_input}' is "
                                   f"{_axis(dims)}, expected the dynamic axis '{STEER_BATCH_DIM}'")


def _axis(dims: Dims) -> str:
    if not dims:
        return "missing (scalar)"
    return f"fixed at {dims[0]}" if isinstance(dims[0], int) else f"named {dims[0]!r}" if dims[0] else "unnamed"


def _check_sizes(path: str | Path, contract: OnnxContract, inputs: Tensors, outputs: Tensors) -> None:
    spec = contract.input
    want = [BATCH_DIM, spec["channels"], spec["height"], spec["width"]]
    if inputs[INPUT_NAME] != want:
        raise ShapeError(f"{path}: input '{INPUT_NAME}' has shape {inputs[INPUT_NAME]}, the preprocessing spec "
                         f"gives {want}")
    layers = {layer.path: layer for layer in contract.layers}
    for tap in contract.taps:
        if tap.layer not in layers:
            raise ShapeError(f"{path}: tap '{tap.output}' is of layer '{tap.layer}', which the metadata does not "
                             "describe (no sub-unit count to check it against)")
        n_subunits = layers[tap.layer].n_subunits
        dims = outputs[tap.output]
        rank = 3 if tap.pooling == TOKEN_TAP else 2
        if len(dims) != rank or dims[-1] != n_subunits:
            raise ShapeError(f"{path}: tap '{tap.output}' has shape {dims}, expected rank {rank} ending in "
                             f"{n_subunits} sub-units")
    shared = contract.export.steer_layout != "per_image"
    for layer in contract.layers:
        dims = inputs.get(layer.steer_input) if layer.steer_input else None
        if dims is not None and (dims[-1:] != [layer.n_subunits] or len(dims) != (1 if shared else 2)):
            raise ShapeError(f"{path}: steer input '{layer.steer_input}' has shape {dims}, expected "
                             f"{[layer.n_subunits] if shared else [STEER_BATCH_DIM, layer.n_subunits]}")
