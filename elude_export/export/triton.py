"""Write a Triton Inference Server model repository for an ELUDe export.

    DIR/<name>/config.pbtxt
    DIR/<name>/1/model.onnx           (+ model.onnx.data for > 2 GB models)
    DIR/<name>/1/model.py             (python backend only: runs model.onnx with onnxruntime)

Everything comes from the `.onnx` file alone (its graph interface and `elude.*` metadata).
The model folder is staged and swapped in whole (`artifacts.atomic_directory`) with the usual
permissions (0755 folders, 0644 files under a 022 umask): the Triton server often runs as
another user than the one who exported.
With `max_batch_size > 0` Triton gives every tensor a leading batch axis, so steer inputs
must be per image (`steer_layout="per_image"`: shape (steer_batch, n_subunits) with a
(1, n_subunits) default); they are declared `optional: true`, and the dynamic batcher only
groups requests that send the same set of inputs. Taps are ordinary outputs. The config is
written as protobuf text by hand (tritonclient is a dev-only dependency); tests parse it with
Triton's own `ModelConfig` schema.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from elude_export.artifacts import atomic_directory
from elude_export.errors import ExportError
from elude_export.export.contract import read_contract

BACKENDS = ("onnxruntime", "python")
INSTANCE_KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 6: "TYPE_INT32", 7: "TYPE_INT64",
                   2: "TYPE_UINT8", 3: "TYPE_INT8", 9: "TYPE_BOOL"}
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass
class TensorSpec:
    name: str
    data_type: str
    dims: list[int]  # without the batch axis
    optional: bool = False


def graph_tensors(onnx_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the graph without their batch axis; steer defaults count as inputs."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def spec(value, optional: bool) -> TensorSpec:
        tensor = value.type.tensor_type
        if tensor.elem_type not in _ONNX_TO_TRITON:
            raise ExportError(f"tensor {value.name}: ONNX element type {tensor.elem_type} has no Triton type")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        return TensorSpec(value.name, _ONNX_TO_TRITON[tensor.elem_type], dims, optional)

    inputs = [spec(v, v.name in initializers) for v in model.graph.input]
    outputs = [spec(v, False) for v in model.graph.output]
    return inputs, outputs


def config_text(name: str, backend: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                max_batch_size: int, instance_kind: str = "gpu", instance_count: int = 1,
                max_queue_delay_us: int = 500, parameters: dict[str, str] | None = None) -> str:
    """`config.pbtxt` for the given graph interface (tensor dims exclude the batch axis)."""

    def tensor(spec: TensorSpec, optional_field: bool) -> str:
        lines = [f'    name: "{spec.name}"', f"    data_type: {spec.data_type}",
                 f"    dims: [ {', '.join(str(d) for d in spec.dims)} ]"]
        if optional_field and spec.optional:
            lines.append("    optional: true")
        return "  {\n" + "\n".join(lines) + "\n  }"

    preferred = [size for size in (4, 8, 16, 32, 64) if size <= max_batch_size]
    parts = [
        f'name: "{name}"',
        f'backend: "{backend}"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(tensor(s, True) for s in inputs) + "\n]",
        "output [\n" + ",\n".join(tensor(s, False) for s in outputs) + "\n]",
    ]
    if max_batch_size > 0:
        parts.append("dynamic_batching {\n"
                     + (f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" if preferred else "")
                     + f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    parts.append(f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {INSTANCE_KINDS[instance_kind]}\n  }}\n]")
    for key, value in (parameters or {}).items():
        parts.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: {json.dumps(value)} }}\n}}')
    return "\n".join(parts) + "\n"


def write_triton_repository(
    onnx_path: str | Path,
    repository: str | Path,
    name: str = "elude",
    backend: str = "onnxruntime",
    max_batch_size: int = 32,
    instance_kind: str = "gpu",
    instance_count: int = 1,
    max_queue_delay_us: int = 500,
) -> Path:
    """Write `repository/<name>/` (replacing an older one atomically); returns the model folder."""
    onnx_path, repository = Path(onnx_path), Path(repository)
    if backend not in BACKENDS:
        raise ExportError(f"unknown Triton backend '{backend}' (use {' or '.join(BACKENDS)})")
    if instance_kind not in INSTANCE_KINDS:
        raise ExportError(f"unknown instance kind '{instance_kind}' (use gpu or cpu)")
    if not _NAME.match(name):
        raise ExportError(f"Triton model name '{name}' may only hold letters, digits, '_', '.', '-'")
    if max_batch_size < 0:
        raise ExportError("max_batch_size must be >= 0")
    try:
        contract = read_contract(onnx_path)
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(f"cannot build a Triton repository from {onnx_path}: {exc}") from exc
    inputs, outputs = graph_tensors(onnx_path)
    steer_names = {layer.steer_input for layer in contract.layers if layer.steer_input}
    if max_batch_size > 0:
        if steer_names and contract.export.steer_layout != "per_image":
            raise ExportError("steer inputs of shape (n_subunits,) cannot be batched by Triton; export with "
                              "per-image steers (export_onnx(..., options=ExportOptions(steer_layout='per_image')), "
                              "which `elude export --triton-repo` does)")
        for spec in inputs + outputs:
            if not spec.dims or spec.dims[0] != -1:
                raise ExportError(f"tensor {spec.name} has no variable batch axis; use max_batch_size 0")
            spec.dims = spec.dims[1:]
    parameters = {"elude.model_name": contract.model_name, "elude.plan_fingerprint": contract.plan_fingerprint}
    text = config_text(name, backend, inputs, outputs, max_batch_size, instance_kind, instance_count,
                       max_queue_delay_us, parameters)
    try:
        repository.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot write Triton repository {repository}: {exc.strerror}") from exc
    target = repository / name
    with atomic_directory(target, ExportError) as stage:  # usual folder/file modes: Triton may run as another user
        version = stage / "1"
        version.mkdir()
        shutil.copyfile(onnx_path, version / "model.onnx")
        data = onnx_path.with_name(onnx_path.name + ".data")
        if data.is_file():  # the graph refers to its weights file by this name: keep it
            shutil.copyfile(data, version / data.name)
        if backend == "python":
            shutil.copyfile(PYTHON_MODEL, version / "model.py")
        (stage / "config.pbtxt").write_text(text)
    return target
