"""`elude serve` / `python -m serving`: user errors are one `error:` line (exit 2); a real start works."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from elude_export.cli import main
from serving.config import ServeConfig
from serving.server import free_port
from serving_fixtures import build_fixture_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_fixture_model(tmp_path_factory.mktemp("cli") / "fixture.onnx").path


def plain_onnx(path) -> str:
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "plain",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


@pytest.mark.parametrize("make_args, message", [
    (lambda tmp: [str(tmp / "missing.onnx")], "ONNX model not found"),
    (lambda tmp: [plain_onnx(tmp / "plain.onnx")], "not an ELUDe export"),
    (lambda tmp: [str((tmp / "junk.onnx").write_bytes(b"not onnx") and tmp / "junk.onnx")], "not a loadable ONNX"),
])
def test_user_errors_are_one_line(tmp_path, make_args, message):
    result = CliRunner().invoke(main, ["serve", *make_args(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output
    assert "Traceback" not in result.output


def test_taken_port_is_a_user_error(model_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", str(model_path), "--port", str(port)])
    assert result.exit_code == 2 and result.output.startswith("error: cannot listen on 127.0.0.1:")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_user_error(model_path):
    result = CliRunner().invoke(main, ["serve", str(model_path), "--provider", "cuda", "--port", "0"])
    assert result.exit_code == 2 and "provider 'cuda' requested" in result.output


def test_bad_settings_from_flags_and_environment(model_path):
    result = CliRunner().invoke(main, ["serve", str(model_path), "--max-batch", "0"])
    assert result.exit_code == 2 and "max_batch must be at least 1" in result.output
    result = CliRunner().invoke(main, ["serve", str(model_path)], env={"ELUDE_SERVE_QUEUE_SIZE": "0"})
    assert result.exit_code == 2 and "queue_size must be at least 1" in result.output
    result = CliRunner().invoke(main, ["serve", str(model_path), "--provider", "tpu"])
    assert result.exit_code == 2 and "tpu" in result.output
    result = CliRunner().invoke(main, ["serve", str(model_path), "--instances", "-1"])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "instances" in result.output
    result = CliRunner().invoke(main, ["serve", str(model_path)], env={"ELUDE_SERVE_JSON_WORKERS": "2"})
    assert result.exit_code == 2 and "json_workers must be 0 or 1, got 2" in result.output


def test_config_reads_environment():
    config = ServeConfig.from_env("m.onnx", {"ELUDE_SERVE_PORT": "9123", "ELUDE_SERVE_BATCH_TIMEOUT_MS": "0.5"},
                                  max_batch=4, host=None)
    assert (config.port, config.batch_timeout_ms, config.max_batch, config.host) == (9123, 0.5, 4, "127.0.0.1")
    with pytest.raises(ValueError, match="ELUDE_SERVE_PORT"):
        ServeConfig.from_env("m.onnx", {"ELUDE_SERVE_PORT": "eighty"})


def test_python_m_serving_starts_and_stops(model_path):
    port = free_port()
    env = {**os.environ, "ELUDE_SERVE_PORT": str(port), "ELUDE_SERVE_AUTH_TOKEN": "t0ken"}
    process = subprocess.Popen([sys.executable, "-m", "serving", str(model_path), "--provider", "cpu"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                ready = False
            if ready:
                break
            time.sleep(0.2)
        assert ready, "server did not become ready"
        metadata = httpx.get(f"{url}/v2/models/fixture", headers={"Authorization": "Bearer t0ken"}, timeout=5)
        assert metadata.json()["elude"]["provider"] == "CPUExecutionProvider"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate(timeout=10)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit by SIGTERM is expected)
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output and "CPUExecutionProvider" in output


def test_help_lists_environment_variables():
    out = subprocess.run([sys.executable, "-m", "serving", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ELUDE_SERVE_MAX_BATCH" in out.stdout and "python -m serving" in out.stdout
