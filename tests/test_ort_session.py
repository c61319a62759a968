"""One onnxruntime session helper for `validate` and the server: providers, options, the silent CPU fallback."""

from __future__ import annotations

import subprocess
import sys

import onnxruntime as ort
import pytest

from elude_export.errors import ModelLoadError, ValidationError
from elude_export.export import ort_session
from elude_export.export.ort_session import CPU, CUDA, SessionError, choose_providers, open_session, session_options

from serving_fixtures import build_fixture_model

HAS_CUDA = CUDA in ort.get_available_providers()


@pytest.fixture(scope="module")
def fixture_path(tmp_path_factory):
    return build_fixture_model(tmp_path_factory.mktemp("ort") / "fixture.onnx").path


def test_cpu_is_cpu_and_cuda_runs_without_tf32(monkeypatch):
    assert choose_providers("cpu") == [CPU]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    for provider in ("auto", "cuda"):
        # TF32 off: served outputs must be the ones validate measured in fp32
        assert choose_providers(provider) == [(CUDA, {"use_tf32": "0"}), CPU]
    assert choose_providers("cpu") == [CPU]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    assert choose_providers("auto") == [CPU]


@pytest.mark.parametrize("error", [ValidationError, ModelLoadError])
def test_errors_are_the_callers_type(error, monkeypatch):
    with pytest.raises(error, match="unknown provider 'tpu'"):
        choose_providers("tpu", error)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(error, match="no CUDAExecutionProvider"):
        choose_providers("cuda", error)
    with pytest.raises(SessionError):  # the common one when the caller names none
        choose_providers("cuda")


def test_session_options():
    default = session_options()
    assert default.log_severity_level == 3
    assert default.intra_op_num_threads == 0 and default.inter_op_num_threads == 0
    served = session_options(threads=2, inter_op_threads=1, allow_spinning=False)
    assert served.intra_op_num_threads == 2 and served.inter_op_num_threads == 1
    assert served.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(allow_spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_open_session_runs_on_cpu(fixture_path):
    session = open_session(fixture_path, "cpu", ValidationError, threads=1)
    assert session.get_providers()[0] == CPU


def test_unloadable_file_is_the_callers_error(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    for error in (ValidationError, ModelLoadError):
        with pytest.raises(error, match="not a loadable ONNX model"):
            open_session(junk, "cpu", error)


def test_silent_cpu_fallback_is_an_error(fixture_path, monkeypatch):
    """onnxruntime runs on CPU when CUDA libraries do not load; a `cuda` request must not accept that."""
    monkeypatch.setattr(ort_session, "choose_providers", lambda provider, error: [CPU])
    with pytest.raises(ModelLoadError, match="requested but onnxruntime runs .* on CPUExecutionProvider"):
        open_session(fixture_path, "cuda", ModelLoadError)


def test_server_and_validate_share_it(fixture_path):
    import serving.runtime
    import elude_export.export.validate as validate

    assert serving.runtime.open_session is validate.open_session is open_session
    runtime = serving.runtime.ModelRuntime(fixture_path, "cpu", threads=1)
    assert runtime.provider == CPU
    if not HAS_CUDA:
        with pytest.raises(ModelLoadError, match="no CUDAExecutionProvider"):
            serving.runtime.ModelRuntime(fixture_path, "cuda")


def test_it_is_torch_free():
    code = ("import sys, elude_export.export.ort_session; "
            "print(sorted(m for m in ('torch', 'timm', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
