"""Overload answers 503 at once (bounded queue, bounded wait) instead of growing memory or latency."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from serving.runtime import NO_STEERING, ModelRuntime
from serving_fixtures import build_fixture_model, running_server, sample_inputs

INFER = "/v2/models/fixture/infer"


class SlowRuntime(ModelRuntime):
    """The fixture model, made slow: stands in for a big model on a busy accelerator."""

    delay_s = 0.3

    def run(self, images, steering=NO_STEERING, instance=0):
        time.sleep(self.delay_s)
        return super().run(images, steering, instance)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_fixture_model(tmp_path_factory.mktemp("overload") / "fixture.onnx").path


def body() -> dict:
    x = sample_inputs(1, np.random.default_rng(0))
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": "logits"}]}


def timed_post(url: str) -> tuple[int, float, dict]:
    with httpx.Client(base_url=url, timeout=20) as http:
        started = time.perf_counter()
        response = http.post(INFER, json=body())
        return response.status_code, time.perf_counter() - started, dict(response.headers)


def test_tiny_queue_returns_503_quickly(model_path):
    runtime = SlowRuntime(model_path)
    with running_server(model_path, runtime, queue_size=2, max_batch=1, batch_timeout_ms=0) as (url, app):
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: timed_post(url), range(12)))
        rejected = [(seconds, headers) for status, seconds, headers in results if status == 503]
        served = [status for status, _, _ in results if status == 200]
        assert len(served) + len(rejected) == 12
        assert served and len(rejected) >= 6
        # a rejection costs no wait: far below one run (0.3 s), let alone the 12 x 0.3 s backlog
        assert max(seconds for seconds, _ in rejected) < 1.0
        assert all(headers.get("retry-after") == "1" for _, headers in rejected)
        status, _, _ = timed_post(url)  # and it recovers once the burst is gone
        assert status == 200
        errors = app.state.elude.metrics.errors.labels(cause="queue_full")._value.get()
        assert errors == len(rejected)


def test_request_timeout_is_503(model_path):
    runtime = SlowRuntime(model_path)
    runtime.delay_s = 0.6
    with running_server(model_path, runtime, request_timeout_s=0.2, max_batch=1) as (url, _app):
        status, seconds, _ = timed_post(url)
        assert status == 503 and seconds < 0.6
        with httpx.Client(base_url=url, timeout=10) as http:
            assert "not served within" in http.post(INFER, json=body()).json()["error"]
