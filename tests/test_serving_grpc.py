"""The KServe v2 gRPC service, driven by `tritonclient.grpc` unchanged, sharing queue, auth and metrics with REST."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from serving.server import free_port
from serving.steering import steer_vectors
from serving_fixtures import build_fixture_model, running_server, sample_inputs

TOKEN = "grpc-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    fixture = build_fixture_model(tmp_path_factory.mktemp("grpc") / "fixture.onnx")
    port = free_port()
    with running_server(fixture.path, grpc_port=port, auth_token=TOKEN) as (url, app):
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        yield fixture, client, url, app
        client.close()


def image_input(x: np.ndarray) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_readiness_and_metadata(served):
    _fixture, client, _url, _app = served
    assert client.is_server_live() and client.is_server_ready()  # probes need no token
    assert client.is_model_ready("fixture", headers=AUTH)
    meta = client.get_server_metadata(headers=AUTH, as_json=True)
    assert "statistics" in meta["extensions"] and meta["name"] == "elude-serve"
    model = client.get_model_metadata("fixture", headers=AUTH, as_json=True)
    inputs = {t["name"]: t for t in model["inputs"]}
    assert inputs["input"]["shape"] == ["-1", "3", "32", "32"] and "steer.blocks.0.mlp" in inputs
    assert {t["name"] for t in model["outputs"]} >= {"logits", "tap.blocks.1.mlp.max"}


def test_infer_matches_the_model_with_and_without_steering(served):
    fixture, client, _url, _app = served
    x = sample_inputs(3, np.random.default_rng(0))
    result = client.infer("fixture", [image_input(x)], headers=AUTH)
    expected = fixture.forward(x)
    np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("tap.blocks.0.mlp.max"), expected["tap.blocks.0.mlp.max"],
                               rtol=1e-4, atol=1e-5)
    # a raw steer tensor, as a Triton client sends it
    vectors = steer_vectors(fixture.contract, {"blocks.0.mlp/0000.0": 0.0, "blocks.0.mlp/0003.0": 2.0})
    steer = triton_grpc.InferInput("steer.blocks.0.mlp", [10], "FP32")
    steer.set_data_from_numpy(vectors["blocks.0.mlp"])
    wanted = [triton_grpc.InferRequestedOutput("logits")]
    result = client.infer("fixture", [image_input(x), steer], outputs=wanted, headers=AUTH, request_id="r-1")
    steered = fixture.forward(x, {"blocks.0.mlp": vectors["blocks.0.mlp"]})
    np.testing.assert_allclose(result.as_numpy("logits"), steered["logits"], rtol=1e-4, atol=1e-5)
    response = result.get_response(as_json=True)
    assert response["id"] == "r-1" and [o["name"] for o in response["outputs"]] == ["logits"]
    # named steering as a string parameter
    result = client.infer("fixture", [image_input(x)], outputs=wanted, headers=AUTH,
                          parameters={"steer": '{"blocks.0.mlp/0000.0": 0.0, "blocks.0.mlp/0003.0": 2.0}'})
    np.testing.assert_allclose(result.as_numpy("logits"), steered["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["no token", "wrong token", "bad shape", "unknown model", "unknown sub-unit",
                                  "non-finite output"])
def test_errors_have_grpc_status_codes(served, case):
    _fixture, client, _url, _app = served
    x = sample_inputs(1, np.random.default_rng(0))
    kwargs, model, inputs = {"headers": AUTH}, "fixture", [image_input(x)]
    expected = "StatusCode.INVALID_ARGUMENT"
    if case == "no token":
        kwargs, expected = {}, "StatusCode.UNAUTHENTICATED"
    elif case == "wrong token":
        kwargs, expected = {"headers": {"authorization": "Bearer nope"}}, "StatusCode.UNAUTHENTICATED"
    elif case == "bad shape":
        inputs = [image_input(np.zeros((1, 3, 8, 8), np.float32))]
    elif case == "unknown model":
        model, expected = "other", "StatusCode.NOT_FOUND"
    elif case == "unknown sub-unit":
        kwargs["parameters"] = {"steer": '{"nope/0000.0": 0}'}
    else:
        inputs = [image_input(np.full((1, 3, 32, 32), 3e38, np.float32))]
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, inputs, **kwargs)
    assert raised.value.status() == expected, raised.value.message()


def test_grpc_shares_metrics_and_statistics_with_rest(served):
    _fixture, client, url, app = served
    before = app.state.elude.stats.snapshot()["inference_count"]
    client.infer("fixture", [image_input(sample_inputs(2, np.random.default_rng(1)))], headers=AUTH)
    assert app.state.elude.stats.snapshot()["inference_count"] == before + 2
    text = httpx.get(url + "/metrics", headers=AUTH).text
    assert 'elude_requests_total{code="OK",route="grpc:ModelInfer"}' in text
    assert 'elude_requests_total{code="UNAUTHENTICATED",route="grpc:ModelInfer"}' in text
