"""Triton model repository: config parsed by Triton's own protobuf schema; a real tritonserver run."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from elude_export.errors import ExportError
from elude_export.export.contract import read_contract
from elude_export.vocabulary import steer_input_name
from elude_export.export.onnx_export import export_onnx
from elude_export.export.options import ExportOptions
from elude_export.export.triton import write_triton_repository

from test_onnx_export import embedded_model_and_plan



def _model_config_schema():
    """Triton's ModelConfig protobuf, shipped in tritonclient even without its grpc extra.

    `tritonclient.grpc/__init__` refuses to import without grpcio, so load the generated
    module file on its own (it needs only protobuf).
    """
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tritonclient is not installed (dev extra)")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


model_config_pb2 = _model_config_schema()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A per-image-steer export (what Triton's batching needs) with two tapped layers."""
    loaded, plan = embedded_model_and_plan()
    folder = tmp_path_factory.mktemp("triton")
    first, last = plan.layers[0].path, plan.layers[-1].path
    path = export_onnx(loaded, plan, folder / "model.onnx", taps=[f"{first}:max,mean", f"{last}:max"],
                       options=ExportOptions(steer_layout="per_image"))
    return loaded, plan, path


def parse_config(folder: Path):
    config = model_config_pb2.ModelConfig()
    text_format.Parse((folder / "config.pbtxt").read_text(), config)
    return config


def test_onnxruntime_backend_config(exported, tmp_path):
    _, plan, path = exported
    folder = write_triton_repository(path, tmp_path / "repo", name="elude_test", max_batch_size=16)
    assert (folder / "1" / "model.onnx").read_bytes() == path.read_bytes()
    config = parse_config(folder)
    contract = read_contract(path)
    assert config.name == "elude_test" and config.backend == "onnxruntime" and config.max_batch_size == 16
    inputs = {i.name: i for i in config.input}
    assert list(inputs["input"].dims) == [3, 32, 32] and not inputs["input"].optional
    assert inputs["input"].data_type == model_config_pb2.TYPE_FP32
    for layer in contract.layers:
        steer = inputs[steer_input_name(layer.path)]
        assert steer.optional and list(steer.dims) == [layer.n_subunits]
    outputs = {o.name: list(o.dims) for o in config.output}
    assert outputs["logits"] == [4]
    for tap in contract.taps:
        assert outputs[tap.output] == [contract.layer(tap.layer).n_subunits]
    assert config.HasField("dynamic_batching") and max(config.dynamic_batching.preferred_batch_size) <= 16
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert config.parameters["elude.plan_fingerprint"].string_value == plan.fingerprint()


def test_python_backend_repository(exported, tmp_path):
    _, _, path = exported
    folder = write_triton_repository(path, tmp_path / "repo", name="elude_py", backend="python", instance_kind="cpu")
    config = parse_config(folder)
    assert config.backend == "python"
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    model_py = (folder / "1" / "model.py").read_text()
    assert "class TritonPythonModel" in model_py and "import torch" not in model_py
    rewritten = write_triton_repository(path, tmp_path / "repo", name="elude_py", backend="onnxruntime")
    assert parse_config(rewritten).backend == "onnxruntime" and not (rewritten / "1" / "model.py").exists()


def test_shared_steers_cannot_batch(tmp_path):
    loaded, plan = embedded_model_and_plan()
    path = export_onnx(loaded, plan, tmp_path / "shared.onnx", taps=f"{plan.layers[0].path}:max",
                       options=ExportOptions(exporter="torchscript"))
    with pytest.raises(ExportError, match="per-image"):
        write_triton_repository(path, tmp_path / "repo")
    folder = write_triton_repository(path, tmp_path / "repo", max_batch_size=0)  # unbatched: fine as is
    config = parse_config(folder)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list({i.name: i for i in config.input}["input"].dims) == [-1, 3, 32, 32]


# -- a real tritonserver (bundled by the nvidia-pytriton wheel, python backend) ------------------


def _pytriton_server() -> tuple[Path, Path, Path]:
    """(tritonserver binary, python backend folder, stub for this Python) or skip."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nvidia-pytriton is not installed (pip install --no-deps nvidia-pytriton==0.7.0)")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    binary = root / "bin" / "tritonserver"
    backend = root / "backends" / "python"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    for needed in (binary, backend / "libtriton_python.so", stub):
        if not needed.is_file():
            pytest.skip(f"nvidia-pytriton ships no {needed.relative_to(root)} for this platform/Python")
    return binary, backend, stub


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(process: subprocess.Popen, port: int, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"tritonserver exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if "error while loading shared libraries" in log.read_text():  # the stub died; the server would wait
            pytest.fail(f"python backend stub cannot start:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"tritonserver not ready after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def test_tritonserver_serves_taps(exported, tmp_path):
    """Start the bundled tritonserver on 127.0.0.1 and compare its answers with onnxruntime."""
    import tritonclient.http as triton_http

    binary, backend, stub = _pytriton_server()
    _, plan, path = exported
    repo = tmp_path / "repo"
    write_triton_repository(path, repo, name="elude", backend="python", instance_kind="cpu", max_batch_size=8)
    backends = tmp_path / "backends" / "python"  # python backend + the stub built for this Python
    backends.mkdir(parents=True)
    for item in backend.iterdir():
        if item.is_file():
            shutil.copy(item, backends)
    shutil.copy(stub, backends)
    port = _free_port()
    libs = binary.parents[3] / "nvidia_pytriton.libs"  # the wheel's bundled shared libraries
    env = {**os.environ, "LD_LIBRARY_PATH": f"{libs}:{os.environ.get('LD_LIBRARY_PATH', '')}",
           # the stub's embedded Python finds this interpreter (and its packages) on PATH
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = tmp_path / "tritonserver.log"
    command = [str(binary), "--model-repository", str(repo), "--backend-directory", str(backends.parent),
               "--http-address", "127.0.0.1", "--http-port", str(port), "--allow-grpc", "false",
               "--allow-metrics", "false", "--disable-auto-complete-config", "--exit-on-error", "true",
               "--exit-timeout-secs", "5"]
    with open(log, "w") as log_stream:
        process = subprocess.Popen(command, env=env, stdout=log_stream, stderr=subprocess.STDOUT)
    try:
        _wait_ready(process, port, log)
        client = triton_http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60.0)
        contract = read_contract(path)
        names = contract.outputs + [tap.output for tap in contract.taps]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        direct = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
        layer = contract.layers[0]
        steer = np.ones((len(x), layer.n_subunits), np.float32)  # Triton: every input has the request's batch
        steer[1, [c for c, u in enumerate(layer.unit) if layer.unit.count(u) > 1][:8]] = 0.0
        answers = []
        for feed in ({}, {layer.steer_input: steer}):
            inputs = [triton_http.InferInput("input", list(x.shape), "FP32")]
            inputs[0].set_data_from_numpy(x)
            for name, value in feed.items():
                inputs.append(triton_http.InferInput(name, list(value.shape), "FP32"))
                inputs[-1].set_data_from_numpy(value)
            result = client.infer("elude", inputs, outputs=[triton_http.InferRequestedOutput(n) for n in names])
            expected = direct.run(names, {"input": x, **feed})
            for name, value in zip(names, expected):
                np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-6, atol=1e-6, err_msg=name)
            answers.append(result.as_numpy("logits"))
        client.close()
        assert np.array_equal(answers[0][[0, 2]], answers[1][[0, 2]])  # steering is per image
        assert not np.array_equal(answers[0][1], answers[1][1])
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
