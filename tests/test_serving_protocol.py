"""The server speaks KServe v2 to an unmodified `tritonclient.http` client, and matches onnxruntime."""

from __future__ import annotations

import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from serving_fixtures import build_fixture_model, png_bytes, running_server, sample_inputs

tritonclient = pytest.importorskip("tritonclient.http")
TAP0, TAP1 = "tap.blocks.0.mlp.max", "tap.blocks.1.mlp.max"


@pytest.fixture(scope="module")
def fixture_model(tmp_path_factory):
    return build_fixture_model(tmp_path_factory.mktemp("serving") / "fixture.onnx")


@pytest.fixture(scope="module")
def direct(fixture_model):
    return ort.InferenceSession(str(fixture_model.path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def server(fixture_model):
    with running_server(fixture_model.path, max_batch=8, batch_timeout_ms=1.0) as (url, app):
        yield url, app


@pytest.fixture
def client(server):
    client = tritonclient.InferenceServerClient(server[0].removeprefix("http://"), connection_timeout=10,
                                                network_timeout=10)
    yield client
    client.close()


def infer_input(x: np.ndarray, binary: bool = True, name: str = "input"):
    tensor = tritonclient.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def test_health_and_metadata(client, fixture_model):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fixture")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("fixture")
    inputs = {t["name"]: t for t in metadata["inputs"]}
    outputs = {t["name"]: t for t in metadata["outputs"]}
    assert inputs["input"] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
    assert inputs["steer.blocks.0.mlp"]["shape"] == [10]
    assert outputs[TAP0]["shape"] == [-1, 10] and outputs[TAP1]["shape"] == [-1, 8]
    elude = metadata["elude"]
    assert {t["output"] for t in elude["taps"]} == {TAP0, TAP1, "tap.blocks.0.mlp.mean"}
    assert elude["provider"] in ort.get_available_providers()
    assert elude["n_subunits"] == 18
    assert client.get_model_metadata("fixture", model_version="1")["name"] == "fixture"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_direct_session(client, direct, binary):
    x = sample_inputs(3, np.random.default_rng(7))
    outputs = [tritonclient.InferRequestedOutput(name, binary_data=binary) for name in
               ("logits", TAP0, TAP1, "tap.blocks.0.mlp.mean")]
    result = client.infer("fixture", [infer_input(x, binary)], outputs=outputs, request_id="req-1")
    assert result.get_response()["id"] == "req-1"
    expected = dict(zip([o.name for o in direct.get_outputs()], direct.run(None, {"input": x})))
    for name, value in expected.items():
        np.testing.assert_array_equal(result.as_numpy(name), value, err_msg=name)


def test_infer_default_outputs_are_all_binary(client, direct):
    x = sample_inputs(2, np.random.default_rng(8))
    result = client.infer("fixture", [infer_input(x)])  # no outputs -> binary_data_output
    names = {o["name"] for o in result.get_response()["outputs"]}
    assert names == {"logits", TAP0, TAP1, "tap.blocks.0.mlp.mean"}
    np.testing.assert_array_equal(result.as_numpy("logits"), direct.run(["logits"], {"input": x})[0])


def test_steering_by_name_and_by_tensor(client, direct, fixture_model):
    x = sample_inputs(4, np.random.default_rng(9))
    name = "blocks.0.mlp/0003.0"
    layer, column = fixture_model.contract.subunit_index()[name]
    assert (layer, column) == ("blocks.0.mlp", 5)
    steered = client.infer("fixture", [infer_input(x)], parameters={"steer": {name: 0.0}})
    steer = np.ones(10, np.float32)
    steer[column] = 0.0
    expected = direct.run(None, {"input": x, "steer.blocks.0.mlp": steer})
    np.testing.assert_array_equal(steered.as_numpy("logits"), expected[0])
    assert np.all(steered.as_numpy(TAP0)[:, column] == 0)
    assert not np.array_equal(steered.as_numpy("logits"), direct.run(["logits"], {"input": x})[0])

    as_tensor = client.infer("fixture", [infer_input(x), infer_input(steer, name="steer.blocks.0.mlp")])
    np.testing.assert_array_equal(as_tensor.as_numpy("logits"), expected[0])
    # a JSON-string parameter works too (for clients limited to scalar parameters)
    as_string = client.infer("fixture", [infer_input(x)], parameters={"steer": '{"%s": 0.0}' % name})
    np.testing.assert_array_equal(as_string.as_numpy("logits"), expected[0])
    # and steering never leaks into later unsteered requests
    plain = client.infer("fixture", [infer_input(x)])
    np.testing.assert_array_equal(plain.as_numpy("logits"), direct.run(["logits"], {"input": x})[0])


def test_concurrent_requests_are_batched_and_correct(fixture_model, direct):
    xs = [sample_inputs(1, np.random.default_rng(100 + i)) for i in range(24)]
    with running_server(fixture_model.path, max_batch=8, batch_timeout_ms=50.0) as (url, app):
        def call(x):
            with httpx.Client(base_url=url, timeout=10) as http:
                body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                    "data": x.ravel().tolist()}], "outputs": [{"name": "logits"}]}
                response = http.post("/v2/models/fixture/infer", json=body)
                assert response.status_code == 200, response.text
                return np.asarray(response.json()["outputs"][0]["data"], np.float32)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, xs))
        runs = app.state.elude.metrics.batch_size.collect()[0]
        count = next(s.value for s in runs.samples if s.name.endswith("_count"))
        total = next(s.value for s in runs.samples if s.name.endswith("_sum"))
    for x, got in zip(xs, results):
        np.testing.assert_allclose(got, direct.run(["logits"], {"input": x})[0].ravel(), rtol=1e-5, atol=1e-6)
    assert total == 24 and count < 24, "concurrent requests were never batched together"


def test_image_endpoint_names_subunits(server, fixture_model, direct):
    from PIL import Image

    from serving.images import preprocess

    url, _ = server
    rng = np.random.default_rng(3)
    png, jpeg = png_bytes(rng), png_bytes(rng, (64, 64), "JPEG")
    with httpx.Client(base_url=url, timeout=10) as http:
        response = http.post("/v1/models/fixture/image", files=[("file", ("a.png", png, "image/png")),
                                                                 ("file", ("b.jpg", jpeg, "image/jpeg"))],
                             data={"top_k": "3", "top_subunits": "4"})
        assert response.status_code == 200, response.text
        answer = response.json()
        raw = http.post("/v1/models/fixture/image?top_k=2", content=png, headers={"content-type": "image/png"})
        assert raw.status_code == 200, raw.text
        steered = http.post("/v1/models/fixture/image", files={"file": ("a.png", png, "image/png")},
                            data={"steer": '{"blocks.1.mlp/0000.0": 5.0, "blocks.0.mlp/0000.0": 0}'})
        assert steered.status_code == 200 and steered.json()["steered"] is True
    predictions = answer["predictions"]
    assert [p["filename"] for p in predictions] == ["a.png", "b.jpg"]
    batch = preprocess([Image.open(io.BytesIO(png))], fixture_model.contract.input)
    logits = direct.run(["logits"], {"input": batch})[0][0]
    classes = predictions[0]["classes"]
    assert len(classes) == 3 and classes[0]["index"] == int(np.argmax(logits))
    assert [c["probability"] for c in classes] == sorted((c["probability"] for c in classes), reverse=True)
    names = fixture_model.contract.subunit_index()
    for sub_unit in predictions[0]["subunits"]:
        layer, column = names[sub_unit["name"]]
        info = fixture_model.contract.layer(layer)
        assert (sub_unit["unit"], sub_unit["sub"]) == (info.unit[column], info.sub[column])
    assert len(predictions[0]["subunits"]) == 4
    assert raw.json()["predictions"][0]["classes"] == classes[:2]  # raw body == multipart upload
    steered_probabilities = [c["probability"] for c in steered.json()["predictions"][0]["classes"]]
    assert steered_probabilities[:3] != [c["probability"] for c in classes]


def test_subunits_metrics_and_drift_endpoints(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=10) as http:
        listing = http.get("/v1/models/fixture/subunits", params={"layer": "blocks.1.mlp"}).json()
        assert listing["total"] == 8 and listing["subunits"][0]["name"] == "blocks.1.mlp/0000.0"
        metrics = http.get("/metrics").text
        drift = http.get("/v1/monitoring/drift", params={"top": 3}).json()
    for name in ("elude_requests_total", "elude_request_duration_seconds_bucket", "elude_batch_size_images_bucket",
                 "elude_inference_duration_seconds", "elude_layer_fire_rate", "elude_drift_psi_max",
                 "elude_model_info", "elude_queue_depth", "elude_layer_active_subunits"):
        assert name in metrics, name
    assert {layer["layer"] for layer in drift["layers"]} == {"blocks.0.mlp", "blocks.1.mlp"}
    assert len(drift["top"]) <= 3


def test_bearer_token(fixture_model):
    with running_server(fixture_model.path, auth_token="s3cret") as (url, _):
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/v2/health/ready").status_code == 200  # probes stay open
            denied = http.get("/v2/models/fixture")
            assert denied.status_code == 401 and "error" in denied.json()
            assert http.get("/metrics").status_code == 401
            wrong = http.get("/v2/models/fixture", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert http.get("/v2/models/fixture", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        client = tritonclient.InferenceServerClient(url.removeprefix("http://"))
        try:
            x = sample_inputs(1, np.random.default_rng(0))
            result = client.infer("fixture", [infer_input(x)], headers={"Authorization": "Bearer s3cret"})
            assert result.as_numpy("logits").shape == (1, 4)
        finally:
            client.close()


def test_server_modules_do_not_import_torch():
    code = ("import sys, serving.app, serving.server, serving.monitoring, serving.runtime, serving.kserve, "
            "serving.__main__; "
            "print(sorted(m for m in ('torch', 'timm', 'elude_export.fitting.fit', 'elude_export.plan') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
