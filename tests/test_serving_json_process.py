"""Big JSON bodies are parsed in a helper process: same arrays, and a dead helper costs no request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.config import ServeConfig
from serving.json_process import MAX_FAILED_STARTS, JsonSplitter
from serving.json_tensors import split_data_arrays
from serving_fixtures import build_fixture_model, running_server, sample_inputs


def big_body(rng: np.random.Generator, n: int = 40) -> tuple[np.ndarray, bytes]:
    x = sample_inputs(n, rng)
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.tolist()}], "outputs": [{"name": "logits"}]}).encode()
    return x, body


def assert_same_split(got, want) -> None:
    assert got is not None and want is not None
    assert got[0] == want[0] and len(got[1]) == len(want[1])
    for a, b in zip(got[1], want[1]):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def dead(pid: int) -> bool:
    """Killed: gone, or a zombie its parent has not reaped yet (state Z in /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture()
def splitter():
    splitter = JsonSplitter(1)
    yield splitter
    splitter.close()


def test_the_helper_process_parses_exactly_what_the_server_thread_would(splitter, caplog):
    _, body = big_body(np.random.default_rng(0))
    assert_same_split(splitter.split(body), split_data_arrays(body))
    pid = splitter.helper_pid()
    assert pid is not None and pid != os.getpid()
    assert splitter.split(b'{"inputs": [{"data": [1, "a"]}]}') is None  # unusual bodies: the plain parser decides
    assert splitter.helper_pid() == pid and "died" not in caplog.text  # one helper answered all three


def test_a_killed_helper_costs_no_request_and_is_replaced(splitter):
    _, body = big_body(np.random.default_rng(1))
    first = splitter.helper_pid()
    dead_process = splitter._process  # to check its pipes are closed once it is replaced
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not dead(first) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert_same_split(splitter.split(body), split_data_arrays(body))  # parsed here meanwhile
    second = splitter.helper_pid()
    assert second is not None and second != first
    assert dead_process.stdin.closed and dead_process.stdout.closed  # no pipes left open behind it
    assert_same_split(splitter.split(body), split_data_arrays(body))


def test_a_helper_that_keeps_dying_is_given_up_after_three_starts(caplog):
    splitter = JsonSplitter(1, command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    _, body = big_body(np.random.default_rng(4))
    for _ in range(MAX_FAILED_STARTS):
        assert_same_split(splitter.split(body), split_data_arrays(body))
    assert splitter.helper_pid() is None  # given up: no fourth start
    assert_same_split(splitter.split(body), split_data_arrays(body))
    assert "parsing on the server thread from now on" in caplog.text
    splitter.close()


def test_the_helper_works_when_the_server_script_comes_from_stdin(tmp_path):
    """multiprocessing's spawn re-imports `__main__` in the child and fails for `python -`; a pipe helper does not."""
    script = (
        "import json, logging, numpy as np\n"
        "logging.basicConfig()\n"
        "from serving.json_process import JsonSplitter\n"
        "from serving.json_tensors import split_data_arrays\n"
        "body = json.dumps({'inputs': [{'data': np.arange(30000.0).tolist()}]}).encode()\n"
        "splitter = JsonSplitter(1)\n"
        "got, want = splitter.split(body), split_data_arrays(body)\n"
        "assert splitter.helper_pid() is not None and got[0] == want[0] and np.array_equal(got[1][0], want[1][0])\n"
        "splitter.close()\n"
        "print('ok')\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, cwd=root, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert "died" not in done.stderr  # the helper answered; it was not the fallback


def test_no_helper_when_disabled():
    splitter = JsonSplitter(0)
    assert splitter.helper_pid() is None
    _, body = big_body(np.random.default_rng(2))
    assert_same_split(splitter.split(body), split_data_arrays(body))


def test_json_workers_is_zero_or_one():
    for bad in (-1, 2):
        with pytest.raises(ValueError, match="json_workers must be 0 or 1"):
            ServeConfig(json_workers=bad)


def test_server_answers_big_json_through_the_helper_like_binary(tmp_path):
    fixture = build_fixture_model(tmp_path / "fixture.onnx")
    x, body = big_body(np.random.default_rng(3))
    assert len(body) > 64 * 1024  # big enough for the helper
    with running_server(fixture.path) as (url, app):
        with httpx.Client(base_url=url, timeout=30) as http:
            response = http.post("/v2/models/fixture/infer", content=body,
                                 headers={"Content-Type": "application/json"})
            assert response.status_code == 200, response.text
            logits = np.asarray(response.json()["outputs"][0]["data"], np.float32).reshape(len(x), -1)
            assert app.state.elude.json_splitter.helper_pid() not in (None, os.getpid())
            bad = http.post("/v2/models/fixture/infer", content=body.replace(b"]]]", b"]]", 1),
                            headers={"Content-Type": "application/json"})
    np.testing.assert_allclose(logits, fixture.forward(x)["logits"], rtol=1e-5, atol=1e-5)
    assert np.abs(logits).max() > 0.01
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]


def test_only_big_json_leaves_the_event_loop(tmp_path):
    """A binary request's tensors follow a tiny JSON header: parsed on the loop, no thread hop."""
    fixture = build_fixture_model(tmp_path / "fixture.onnx")
    x, json_body = big_body(np.random.default_rng(5))
    raw = x.astype(np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    assert len(raw) > 64 * 1024 > len(header)
    with running_server(fixture.path) as (url, app):
        state, offloaded = app.state.elude, []
        original = state.off_loop

        async def counting_off_loop(fn):
            offloaded.append(fn)
            return await original(fn)

        state.off_loop = counting_off_loop
        with httpx.Client(base_url=url, timeout=30) as http:
            binary = http.post("/v2/models/fixture/infer", content=header + raw,
                               headers={"Inference-Header-Content-Length": str(len(header))})
            assert binary.status_code == 200 and not offloaded
            assert http.post("/v2/models/fixture/infer", content=json_body,
                             headers={"Content-Type": "application/json"}).status_code == 200
            assert offloaded  # the big JSON body was parsed off the loop
