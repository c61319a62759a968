"""Issue #10: idle connections, route labels, non-finite outputs, shutdown, event-loop stalls, labels.

Each test fails on the server before the fix (plain-text 503 under idle connections,
route="unmatched", NaN in 200 responses, SIGTERM hanging, health stalls behind JSON work).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http

from serving_fixtures import build_fixture_model, png_bytes, running_server, sample_inputs, subprocess_server

INFER = "/v2/models/fixture/infer"
LABELS = {"blocks.0.mlp/0000.0": "red circle (0.91)", "blocks.1.mlp/0000.0": "stripes (0.64)"}


@pytest.fixture(scope="module")
def fixture_model(tmp_path_factory):
    return build_fixture_model(tmp_path_factory.mktemp("hardening") / "fixture.onnx", labels=LABELS)


def infer_body(x: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            **extra}


def open_idle(port: int, n: int, partial: bytes = b"") -> list[socket.socket]:
    sockets = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port))
        if partial:
            sock.sendall(partial)
        sockets.append(sock)
    return sockets


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    pattern = "^" + re.escape(name) + r"(?:\{(.*)\})? (\S+)$"  # label values may hold braces: /{model_name}
    total = 0.0
    for found, value in re.findall(pattern, text, re.M):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', found))
        if all(pairs.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def test_idle_connections_leave_health_and_inference_answering(fixture_model):
    with running_server(fixture_model.path, queue_size=16) as (url, _app):
        port = int(url.rsplit(":", 1)[1])
        held = open_idle(port, 700) + open_idle(port, 300, b"POST /v2/models/fixture/infer HTTP/1.1\r\nHost: x\r\n")
        try:
            with httpx.Client(base_url=url, timeout=10) as http:
                http.get("/v2/health/live")  # warm the client's connection
                times = []
                for _ in range(5):
                    started = time.perf_counter()
                    assert http.get("/v2/health/live").status_code == 200
                    times.append(time.perf_counter() - started)
                assert min(times) < 0.05, times
                x = sample_inputs(2, np.random.default_rng(0))
                response = http.post(INFER, json=infer_body(x))
                assert response.status_code == 200
                assert http.get("/metrics").status_code == 200
        finally:
            for sock in held:
                sock.close()


def test_silent_and_half_sent_connections_are_closed(fixture_model):
    with running_server(fixture_model.path, header_timeout_s=0.5, body_timeout_s=0.5) as (url, _app):
        port = int(url.rsplit(":", 1)[1])
        silent, = open_idle(port, 1)
        half_header, = open_idle(port, 1, b"GET /v2/health/live HTTP/1.1\r\nHost")
        slow_body, = open_idle(port, 1, b"POST /v2/models/fixture/infer HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        for sock in (silent, half_header, slow_body):
            sock.settimeout(5)
        assert silent.recv(100) == b""  # closed by the server, no answer needed
        assert half_header.recv(100) == b""
        answer = b""
        while chunk := slow_body.recv(4096):  # headers and body may come in separate segments
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b'"error"' in answer and b"application/json" in answer
        for sock in (silent, half_header, slow_body):
            sock.close()


def test_in_flight_limit_answers_counted_json_503_and_spares_probes(fixture_model):
    with running_server(fixture_model.path, max_in_flight=2, body_timeout_s=5) as (url, _app):
        port = int(url.rsplit(":", 1)[1])
        # two requests in flight: headers sent, body still coming
        held = open_idle(port, 2, b"POST /v2/models/fixture/infer HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n{")
        try:
            time.sleep(0.2)
            with httpx.Client(base_url=url, timeout=10) as http:
                response = http.post(INFER, json=infer_body(sample_inputs(1, np.random.default_rng(0))))
                assert response.status_code == 503 and "in flight" in response.json()["error"]
                assert response.headers["retry-after"] == "1"
                assert http.get("/v2/health/live").status_code == 200
                assert http.get("/v2/health/ready").status_code == 200
                text = http.get("/metrics").text
        finally:
            for sock in held:
                sock.close()
        assert metric(text, "elude_requests_total", route="/v2/models/{model_name}/infer", code="503") == 1
        assert metric(text, "elude_errors_total", cause="in_flight") == 1


def test_inference_routes_are_labelled_by_template(fixture_model):
    with running_server(fixture_model.path) as (url, _app):
        with httpx.Client(base_url=url, timeout=10) as http:
            x = sample_inputs(2, np.random.default_rng(0))
            assert http.post(INFER, json=infer_body(x)).status_code == 200
            assert http.post("/v2/models/fixture/versions/1/infer", json=infer_body(x)).status_code == 200
            png = png_bytes(np.random.default_rng(1))
            assert http.post("/v1/models/fixture/image", files={"file": ("a.png", png)}).status_code == 200
            text = http.get("/metrics").text
    for route in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{version}/infer",
                  "/v1/models/{model_name}/image"):
        assert metric(text, "elude_requests_total", route=route, code="200") == 1, route
        assert metric(text, "elude_request_duration_seconds_count", route=route) == 1, route
    assert metric(text, "elude_requests_total", route="unmatched") == 0


def test_finite_extremes_are_422_and_never_reach_the_monitor(fixture_model):
    with running_server(fixture_model.path) as (url, app):
        with httpx.Client(base_url=url, timeout=10) as http:
            huge = np.full((1, 3, 32, 32), 3e38, np.float32)
            response = http.post(INFER, json=infer_body(huge))
            assert response.status_code == 422 and "NaN or infinite" in response.json()["error"]
            steer = {"blocks.0.mlp/0000.0": 1e39}
            response = http.post(INFER, json=infer_body(sample_inputs(1, np.random.default_rng(0)),
                                                         parameters={"steer": steer}))
            assert response.status_code == 400 and "float32" in response.json()["error"]
            # a finite-but-huge image next to good ones in one batch: only the good ones are observed
            x = sample_inputs(8, np.random.default_rng(2))
            for _ in range(3):
                assert http.post(INFER, json=infer_body(x)).status_code == 200
            assert http.post(INFER, json=infer_body(huge)).status_code == 422
            assert app.state.elude.drain.wait_idle(5)
            text = http.get("/metrics").text
            json.loads(http.get("/v1/monitoring/drift").content)  # strict parse: no bare NaN
    means = [float(v) for v in re.findall(r"^elude_subunit_activation_mean\{[^}]*\} (\S+)$", text, re.M)]
    assert means and all(np.isfinite(means))
    assert metric(text, "elude_monitor_images_total") == 24
    assert metric(text, "elude_errors_total", cause="non_finite") == 2


def test_monitor_skips_non_finite_rows(fixture_model):
    from serving.monitoring import FeatureMonitor

    monitor = FeatureMonitor(fixture_model.contract, window=64)
    outputs = fixture_model.forward(sample_inputs(4, np.random.default_rng(0)))
    outputs["tap.blocks.0.mlp.max"][1, 0] = np.nan
    assert monitor.observe(outputs) == 3
    assert np.isfinite(monitor.statistics()["blocks.0.mlp"]["mean"]).all()


def test_sigterm_does_not_wait_for_a_stalled_upload(fixture_model):
    with subprocess_server(fixture_model.path, "--shutdown-timeout-s", "1", "--body-timeout-s", "60") as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        stalled = open_idle(port, 1, b"POST /v2/models/fixture/infer HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        time.sleep(0.3)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        assert time.monotonic() - started < 8
        stalled[0].close()


def test_health_stays_fast_while_big_json_requests_run(fixture_model):
    """Loose bound (a noisy 2-core box): the benchmark measures the real p99 (< 20 ms target)."""
    x = sample_inputs(64, np.random.default_rng(0))
    body = json.dumps(infer_body(x)).encode()
    stop = threading.Event()
    with subprocess_server(fixture_model.path, "--max-batch", "64") as (url, _process):
        def client() -> int:
            count = 0
            with httpx.Client(base_url=url, timeout=30) as http:
                while not stop.is_set():
                    assert http.post(INFER, content=body, headers={"content-type": "application/json"}).status_code == 200
                    count += 1
            return count

        with ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(client) for _ in range(4)]
            times = []
            with httpx.Client(base_url=url, timeout=10) as http:
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    assert http.get("/v2/health/live").status_code == 200
                    times.append(time.perf_counter() - started)
                    time.sleep(0.01)
            stop.set()
            served = sum(w.result() for w in workers)
    assert served >= 4
    p99 = statistics.quantiles(times, n=100)[98]
    assert p99 < 0.2, f"health p99 {p99 * 1000:.0f} ms under batch-64 JSON load"


def test_labels_reach_the_image_route_subunits_and_metrics(fixture_model):
    with running_server(fixture_model.path, monitor_top_n=50) as (url, app):
        with httpx.Client(base_url=url, timeout=10) as http:
            png = png_bytes(np.random.default_rng(1))
            answer = http.post("/v1/models/fixture/image", files={"file": ("a.png", png)},
                               params={"top_subunits": 18}).json()
            listed = {s["name"]: s["label"] for s in answer["predictions"][0]["subunits"]}
            assert all(listed[name] == text for name, text in LABELS.items() if name in listed)
            assert any(label is None for label in listed.values())  # unlabelled -> null
            rows = {r["name"]: r["label"] for r in http.get("/v1/models/fixture/subunits").json()["subunits"]}
            assert rows["blocks.0.mlp/0000.0"] == "red circle (0.91)" and rows["blocks.0.mlp/0001.0"] is None
            x = sample_inputs(8, np.random.default_rng(0))
            http.post(INFER, json=infer_body(x))
            assert app.state.elude.drain.wait_idle(5)
            text = http.get("/metrics").text
    assert 'elude_subunit_label_info{label="red circle (0.91)",layer="blocks.0.mlp",subunit="blocks.0.mlp/0000.0"} 1.0' in text


def test_triton_configuration_and_statistics_extensions(fixture_model):
    with running_server(fixture_model.path) as (url, _app):
        client = triton_http.InferenceServerClient(url.removeprefix("http://"))
        assert {"model_configuration", "statistics", "binary_tensor_data"} <= set(
            client.get_server_metadata()["extensions"])
        config = client.get_model_config("fixture")
        assert config["name"] == "fixture" and config["platform"] == "onnxruntime_onnx"
        inputs = {t["name"]: t for t in config["input"]}
        assert inputs["input"]["dims"] == [-1, 3, 32, 32] and inputs["input"]["data_type"] == "TYPE_FP32"
        assert inputs["steer.blocks.0.mlp"]["optional"] is True
        assert {t["name"] for t in config["output"]} >= {"logits", "tap.blocks.0.mlp.max"}
        x = sample_inputs(3, np.random.default_rng(0))
        tensor = triton_http.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        for _ in range(2):
            client.infer("fixture", [tensor])
        with pytest.raises(Exception):
            client.infer("fixture", [tensor], parameters={"steer": {"nope/0000.0": 0}})
        stats = client.get_inference_statistics("fixture")["model_stats"][0]
        assert stats["name"] == "fixture" and stats["version"] == "1"
        assert stats["inference_count"] == 6 and stats["execution_count"] == 2
        inference = stats["inference_stats"]
        assert inference["success"]["count"] == 2 and inference["fail"]["count"] == 1
        assert inference["success"]["ns"] >= inference["compute_infer"]["ns"] > 0
        assert stats["last_inference"] > 1_600_000_000_000
        client.close()


def test_big_json_bodies_take_the_piecewise_parser_with_the_same_answers(fixture_model):
    from serving.json_tensors import parse_numbers, split_data_arrays

    x = sample_inputs(16, np.random.default_rng(3))  # ~1 MB of JSON: above the fast-path size
    nested = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}],
              "parameters": {"steer": json.dumps({"blocks.0.mlp/0000.0": 0.5})}, "id": "big"}
    skeleton, arrays = split_data_arrays(json.dumps(nested).encode())
    assert b'"data"' in skeleton and len(arrays) == 1 and arrays[0].size == x.size
    assert parse_numbers(b"1,,2") is None and parse_numbers(b"1,NaN") is None
    with running_server(fixture_model.path, max_batch=16) as (url, _app):
        with httpx.Client(base_url=url, timeout=30) as http:
            answer = http.post(INFER, json=nested).json()
            logits = next(o for o in answer["outputs"] if o["name"] == "logits")
            steer = np.ones(10, np.float32)
            steer[0] = 0.5
            expected = fixture_model.forward(x, {"blocks.0.mlp": steer})["logits"]
            np.testing.assert_allclose(np.reshape(logits["data"], logits["shape"]), expected, rtol=1e-4, atol=1e-5)
            assert answer["id"] == "big"
            text = json.dumps(nested)
            at = text.index('"data": [') + 20
            broken = (text[:at] + text[at:].replace(", ", ",, ", 1)).encode()  # a doubled comma in the numbers
            response = http.post(INFER, content=broken, headers={"content-type": "application/json"})
            assert response.status_code == 400 and "malformed JSON" in response.json()["error"]
