"""onnxruntime's threads run below the event loop (health stays fast on a busy CPU); the GIL switches often."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import numpy as np
import pytest

from serving import priority, server
from serving.batching import MicroBatcher
from serving.config import ServeConfig
from serving.runtime import NO_STEERING, ModelRuntime
from serving_fixtures import build_fixture_model, sample_inputs

linux = pytest.mark.skipif(not priority.PER_THREAD, reason="per-thread nice values are Linux only")


def own_nice() -> int:
    return priority.thread_nice(threading.get_native_id())


def task_nices() -> dict[int, int]:
    """tid -> nice of every thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = priority.thread_nice(int(tid))
        except OSError:  # the thread ended meanwhile
            pass
    return out


@linux
def test_threads_created_inside_call_lowered_inherit_the_lower_priority_and_the_caller_keeps_its_own():
    base = own_nice()
    seen = {}

    def spawn() -> str:
        child = threading.Thread(target=lambda: seen.setdefault("child", own_nice()))
        child.start()
        child.join()
        seen["self"] = own_nice()
        return "done"

    assert priority.call_lowered(spawn, 3) == "done"
    assert seen == {"self": min(19, base + 3), "child": min(19, base + 3)}
    assert own_nice() == base


def test_call_lowered_reraises_on_the_caller_and_zero_runs_inline():
    def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        priority.call_lowered(fail, 2)
    assert priority.call_lowered(threading.get_native_id, 0) == threading.get_native_id()


@linux
def test_onnxruntime_pool_threads_of_a_lowered_runtime_run_at_the_lower_priority(tmp_path):
    path = build_fixture_model(tmp_path / "fixture.onnx").path
    base = own_nice()
    before = task_nices()
    runtime = ModelRuntime(path, "cpu", threads=3, nice=4)
    new = {tid: nice for tid, nice in task_nices().items() if tid not in before}
    assert new and set(new.values()) == {min(19, base + 4)}  # 3 intra-op threads: 2 pool threads, both lowered
    assert own_nice() == base
    x = sample_inputs(2, np.random.default_rng(0))
    plain = ModelRuntime(path, "cpu", threads=3)
    assert np.array_equal(runtime.run(x)["logits"], plain.run(x)["logits"])  # same results, bit for bit


@linux
def test_the_batcher_runs_inference_on_a_lowered_thread():
    seen: list[int] = []

    def run(images, steering):
        seen.append(own_nice())
        return {"y": images}

    async def main() -> None:
        batcher = MicroBatcher([run], max_batch=2, timeout_s=0.0, run_nice=5)
        await batcher.start()
        try:
            await batcher.submit(np.zeros((1, 2), np.float32), NO_STEERING, 5.0)
        finally:
            await batcher.stop()

    asyncio.run(main())
    assert seen == [min(19, own_nice() + 5)]


def test_inference_nice_is_validated():
    assert ServeConfig().inference_nice == 0  # opt-in: beside busy neighbours lowered threads starve
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="inference_nice must be in 0..19"):
            ServeConfig(inference_nice=bad)


def test_serve_shortens_the_gil_switch_interval(monkeypatch, tmp_path):
    seen = {}

    class FakeServer:
        def __init__(self, _config) -> None:
            pass

        def run(self) -> None:
            seen["interval"] = sys.getswitchinterval()

    previous = sys.getswitchinterval()
    monkeypatch.setattr(server, "create_app", lambda config: None)
    monkeypatch.setattr(server, "uvicorn_config", lambda app, config: None)
    monkeypatch.setattr(server.uvicorn, "Server", FakeServer)
    try:
        sys.setswitchinterval(0.005)  # Python's default, whatever an earlier in-process serve left
        server.serve(ServeConfig(model_path=tmp_path / "m.onnx", port=0))
    finally:
        sys.setswitchinterval(previous)
    assert seen["interval"] == pytest.approx(priority.SWITCH_INTERVAL_S)
