"""Every user mistake is a clear 4xx `{"error": ...}` and the server keeps serving afterwards."""

from __future__ import annotations

import gzip
import io
import json

import httpx
import numpy as np
import pytest

from serving_fixtures import build_fixture_model, png_bytes, running_server, sample_inputs

MAX_BODY = 256 * 1024
INFER = "/v2/models/fixture/infer"
IMAGE = "/v1/models/fixture/image"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    fixture = build_fixture_model(tmp_path_factory.mktemp("serving") / "fixture.onnx")
    with running_server(fixture.path, max_body_bytes=MAX_BODY, max_image_pixels=200 * 200) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], timeout=10) as client:
        yield client


def tensor(x: np.ndarray, datatype: str = "FP32", name: str = "input") -> dict:
    return {"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}


def good_request() -> dict:
    return {"inputs": [tensor(sample_inputs(1, np.random.default_rng(0)))], "outputs": [{"name": "logits"}]}


def binary_request(x: np.ndarray, declared_size: int | None = None, header_length: int | None = None):
    raw = x.astype(np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": declared_size or len(raw)}}]}).encode()
    size = len(header) if header_length is None else header_length
    return header + raw, {"Inference-Header-Content-Length": str(size)}


def png_truncated() -> bytes:
    data = png_bytes(np.random.default_rng(1), (64, 64))
    return data[: len(data) // 2]


def solid_png(size: tuple[int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")  # compresses to a few hundred bytes
    return buffer.getvalue()


x1 = sample_inputs(1, np.random.default_rng(0))
bad_shape = {"inputs": [tensor(sample_inputs(1, np.random.default_rng(0))[:, :2])]}
wrong_dtype = {"inputs": [{**tensor(x1), "datatype": "INT32", "data": [1] * x1.size}]}
unknown_dtype = {"inputs": [{**tensor(x1), "datatype": "COMPLEX"}]}
count_mismatch = {"inputs": [{**tensor(x1), "data": [0.0] * 10}]}
strings_in_data = {"inputs": [{**tensor(x1), "data": ["a"] * x1.size}]}
huge_shape = {"inputs": [{"name": "input", "shape": [10 ** 9, 3, 32, 32], "datatype": "FP32", "data": []}]}
unknown_input = {"inputs": [tensor(x1), tensor(np.ones(3, np.float32), name="bogus")]}
unknown_output = {**good_request(), "outputs": [{"name": "nope"}]}
unknown_subunit = {**good_request(), "parameters": {"steer": {"blocks.9.mlp/0001.0": 0.0}}}
bad_scale = {**good_request(), "parameters": {"steer": {"blocks.0.mlp/0001.0": "zero"}}}
steer_shape = {"inputs": [tensor(x1), tensor(np.ones(3, np.float32), name="steer.blocks.0.mlp")]}
missing_input = {"inputs": [tensor(np.ones(10, np.float32), name="steer.blocks.0.mlp")]}
not_bool = {**good_request(), "parameters": {"binary_data_output": "yes"}}

INFER_CASES = {
    # name: (kwargs for http.post, expected status, fragment of the error)
    "wrong shape": (dict(json=bad_shape), 400, "shape"),
    "wrong dtype": (dict(json=wrong_dtype), 400, "FP32"),
    "unknown dtype": (dict(json=unknown_dtype), 400, "datatype"),
    "value count": (dict(json=count_mismatch), 400, "values given"),
    "strings as data": (dict(json=strings_in_data), 400, "numbers"),
    "huge shape": (dict(json=huge_shape), 413, "elements"),
    "unknown input": (dict(json=unknown_input), 400, "unknown input"),
    "missing input": (dict(json=missing_input), 400, "missing input"),
    "unknown output": (dict(json=unknown_output), 400, "unknown output"),
    "unknown sub-unit": (dict(json=unknown_subunit), 400, "unknown sub-unit"),
    "non-numeric scale": (dict(json=bad_scale), 400, "finite number"),
    "steer tensor shape": (dict(json=steer_shape), 400, "shape"),
    "binary_data_output not bool": (dict(json=not_bool), 400, "true or false"),
    "NaN input": (dict(content=json.dumps({"inputs": [{**tensor(x1), "data": [float("nan")] * x1.size}]}),
                       headers={"content-type": "application/json"}), 400, "NaN"),
    "malformed JSON": (dict(content=b'{"inputs": [', headers={"content-type": "application/json"}), 400,
                       "malformed JSON"),
    "JSON not an object": (dict(json=[1, 2, 3]), 400, "JSON object"),
    "empty inputs": (dict(json={"inputs": []}), 400, "non-empty"),
    "binary size wrong": (dict(zip(("content", "headers"), binary_request(x1, declared_size=12))), 400,
                          "binary_data_size"),
    "binary truncated": (dict(zip(("content", "headers"), (binary_request(x1)[0][:-100],
                                                           binary_request(x1)[1]))), 400, "ends after"),
    "header length too big": (dict(zip(("content", "headers"), binary_request(x1, header_length=10 ** 7))), 400,
                              "does not fit"),
    "header length not int": (dict(content=b"{}", headers={"Inference-Header-Content-Length": "x"}), 400,
                              "integer"),
    "huge payload": (dict(content=b"0" * (MAX_BODY + 1)), 413, "exceeds"),
    "bad gzip": (dict(content=b"not gzip", headers={"content-encoding": "gzip"}), 400, "gzip"),
    "gzip bomb": (dict(content=gzip.compress(b" " * (MAX_BODY * 4)), headers={"content-encoding": "gzip"}), 413,
                  "decompressed"),
    "unknown encoding": (dict(content=b"{}", headers={"content-encoding": "br"}), 415, "Content-Encoding"),
}


@pytest.mark.parametrize("case", list(INFER_CASES))
def test_bad_infer_requests_are_clear_4xx(http, case):
    kwargs, status, fragment = INFER_CASES[case]
    response = http.post(INFER, **kwargs)
    assert response.status_code == status, response.text
    assert fragment.lower() in response.json()["error"].lower()


def test_chunked_body_over_the_limit_is_413(http):
    def chunks():
        for _ in range(MAX_BODY // 16384 + 2):
            yield b"x" * 16384

    response = http.post(INFER, content=chunks())  # no Content-Length: counted while streaming
    assert response.status_code == 413


IMAGE_CASES = {
    "not an image": (dict(files={"file": ("a.txt", b"hello, not a picture", "text/plain")}), 400, "not a png"),
    "truncated image": (dict(files={"file": ("t.png", png_truncated(), "image/png")}), 400, "truncated"),
    "empty upload": (dict(files={"file": ("e.png", b"", "image/png")}), 400, "empty"),
    "no file": (dict(data={"top_k": "1"}, files={"x": ("", b"", "")}), 400, ""),
    "too many pixels": (dict(files={"file": ("big.png", solid_png((300, 300)), "image/png")}), 413, "pixels"),
    "unknown sub-unit": (dict(files={"file": ("a.png", png_bytes(np.random.default_rng(3)), "image/png")},
                              data={"steer": '{"nope/0000.0": 0}'}), 400, "unknown sub-unit"),
    "steer not JSON": (dict(files={"file": ("a.png", png_bytes(np.random.default_rng(3)), "image/png")},
                            data={"steer": "{oops"}), 400, "malformed JSON"),
    "top_k not int": (dict(files={"file": ("a.png", png_bytes(np.random.default_rng(3)), "image/png")},
                           data={"top_k": "many"}), 400, "integer"),
    "raw text body": (dict(content=b"abc", headers={"content-type": "text/plain"}), 415, "multipart"),
    "raw garbage image": (dict(content=b"\x89PNG garbage", headers={"content-type": "image/png"}), 400, "png"),
    "bad query": (dict(params={"top_k": "-1"}, content=b"abc", headers={"content-type": "image/png"}), 400,
                  "top_k"),
    "broken multipart": (dict(content=b"--zz\r\nbroken", headers={"content-type": "multipart/form-data; boundary=zz"}),
                         400, ""),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_image_requests_are_clear_4xx(http, case):
    kwargs, status, fragment = IMAGE_CASES[case]
    response = http.post(IMAGE, **kwargs)
    assert response.status_code == status, response.text
    assert fragment.lower() in response.json()["error"].lower()


@pytest.mark.parametrize("method, path, status", [
    ("POST", "/v2/models/other/infer", 404),
    ("GET", "/v2/models/other", 404),
    ("GET", "/v2/models/fixture/versions/7", 404),
    ("GET", "/v2/models/fixture/ready", 200),
    ("POST", "/v1/models/other/image", 404),
    ("GET", "/v1/monitoring/drift?layer=nope", 404),
    ("GET", "/v1/monitoring/drift?top=0", 400),
    ("GET", "/nothing/here", 404),
    ("GET", INFER, 405),
])
def test_unknown_routes_and_models(http, method, path, status):
    response = http.request(method, path, json=good_request() if method == "POST" else None)
    assert response.status_code == status, response.text
    if status != 200:
        assert "error" in response.json()


def test_server_keeps_serving_and_counts_causes(http):
    for case in ("malformed JSON", "unknown sub-unit", "huge payload"):
        http.post(INFER, **INFER_CASES[case][0])
    http.post(IMAGE, **IMAGE_CASES["truncated image"][0])
    http.get("/v2/models/other")
    response = http.post(INFER, json=good_request())
    assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [1, 4]
    assert http.get("/v2/health/ready").status_code == 200
    metrics = http.get("/metrics").text
    for cause in ("malformed_json", "unknown_subunit", "too_large", "decode", "not_found"):
        assert f'elude_errors_total{{cause="{cause}"}}' in metrics, cause
    assert 'code="500"' not in metrics
