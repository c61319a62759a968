"""Model instances: batches run side by side on their own sessions, with the same outputs as one."""

from __future__ import annotations

import asyncio
import os
import threading

import httpx
import numpy as np
import pytest

from serving.batching import MicroBatcher
from serving.config import ServeConfig
from serving.errors import Overloaded
from serving.instances import InstancePlan, cpu_quota, plan_instances, usable_cores
from serving.runtime import NO_STEERING, ModelRuntime
from serving_fixtures import build_fixture_model, running_server, sample_inputs

INFER = "/v2/models/fixture/infer"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_fixture_model(tmp_path_factory.mktemp("instances") / "fixture.onnx").path


@pytest.mark.parametrize("instances, threads, on_cuda, cores, expected", [
    (0, 0, False, 2, InstancePlan(2, 1)),     # the default on a small CPU: two single-threaded instances
    (0, 0, False, 16, InstancePlan(2, 8)),    # the cores split between them
    (0, 0, False, 1, InstancePlan(1, 0)),     # one core: one instance, onnxruntime's own threading
    (0, 0, True, 16, InstancePlan(1, 0)),     # CUDA runs are serialised on the device
    (3, 0, False, 16, InstancePlan(3, 5)),
    (1, 0, False, 16, InstancePlan(1, 0)),
    (2, 4, False, 2, InstancePlan(2, 4)),     # what the user asks for is kept
    (2, 0, True, 16, InstancePlan(2, 0)),
])
def test_automatic_instances_and_threads(instances, threads, on_cuda, cores, expected):
    assert plan_instances(instances, threads, on_cuda, cores) == expected


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "200000 100000\n"}, 2.0),                     # cgroup v2, a 2-CPU limit
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),                       # v2, no limit
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),    # v1, no limit
    ({}, None),                                                 # no cgroup files (macOS, bare metal)
])
def test_container_cpu_quota_is_read(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == expected


def test_a_cpu_limit_caps_the_cores_instances_split(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: 2 cores' worth of threads at most
    assert usable_cores(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    assert usable_cores(tmp_path / "missing") == len(os.sched_getaffinity(0))


def test_negative_instances_are_refused():
    with pytest.raises(ValueError, match="instances, threads"):
        ServeConfig(instances=-1)


def test_batches_run_side_by_side_on_their_own_instances():
    """Two runs that each wait for the other can only finish when they really run at once."""
    both_running = threading.Barrier(2, timeout=10)
    seen: list[tuple[int, str]] = []

    def runner(instance: int):
        def run(images, steering):
            seen.append((instance, threading.current_thread().name))
            both_running.wait()  # BrokenBarrierError (a failed request) if the runs were serialised
            return {"y": images * 2}
        return run

    async def main() -> list:
        batcher = MicroBatcher([runner(0), runner(1)], max_batch=1, timeout_s=0.0)
        await batcher.start()
        try:
            x = np.arange(4, dtype=np.float32).reshape(2, 2)
            return await asyncio.gather(batcher.submit(x[:1], NO_STEERING, 20.0), batcher.submit(x[1:], NO_STEERING, 20.0))
        finally:
            await batcher.stop()

    first, second = asyncio.run(main())
    assert first["y"].tolist() == [[0.0, 2.0]] and second["y"].tolist() == [[4.0, 6.0]]
    assert sorted(instance for instance, _ in seen) == [0, 1]
    assert len({name for _, name in seen}) == 2 and all(name.startswith("elude-run-") for _, name in seen)


def test_stopping_answers_requests_of_running_batches():
    release = threading.Event()

    def run(images, steering):
        release.wait(10)
        return {"y": images}

    async def main() -> BaseException | None:
        batcher = MicroBatcher([run], max_batch=1, timeout_s=0.0)
        await batcher.start()
        request = asyncio.ensure_future(batcher.submit(np.ones((1, 2), np.float32), NO_STEERING, 20.0))
        await asyncio.sleep(0.2)  # the batch is running
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.1)
        release.set()  # the run thread ends its run; the request was already answered
        await stopping
        return request.exception()

    error = asyncio.run(main())
    assert isinstance(error, Overloaded) and "shutting down" in str(error)


def test_runtime_opens_one_session_per_instance_with_identical_outputs(model_path):
    runtime = ModelRuntime(model_path, "cpu", instances=2)
    assert runtime.plan.instances == 2 and len(runtime.sessions) == 2
    assert runtime.sessions[0] is not runtime.sessions[1]
    x = sample_inputs(5, np.random.default_rng(1))
    outputs = [run(x, NO_STEERING) for run in runtime.runners()]
    assert np.abs(x).max() > 0.1
    for name in outputs[0]:
        assert np.array_equal(outputs[0][name], outputs[1][name]), name


def test_server_with_two_instances_answers_concurrent_requests_exactly(model_path):
    single = ModelRuntime(model_path, "cpu", instances=1)
    rng = np.random.default_rng(2)
    batches = [sample_inputs(3, rng) for _ in range(12)]
    with running_server(model_path, instances=2, max_batch=3) as (url, app):
        assert app.state.elude.runtime.plan.instances == 2

        def post(x: np.ndarray) -> np.ndarray:
            body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                "data": x.ravel().tolist()}], "outputs": [{"name": "logits"}]}
            with httpx.Client(base_url=url, timeout=20) as http:
                response = http.post(INFER, json=body)
            assert response.status_code == 200, response.text
            return np.asarray(response.json()["outputs"][0]["data"], np.float32).reshape(len(x), -1)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(post, batches))
        with httpx.Client(base_url=url, timeout=20) as http:
            config = http.get("/v2/models/fixture/config").json()
            described = http.get("/v2/models/fixture").json()["elude"]
    for x, answer in zip(batches, answers):
        assert np.array_equal(answer, single.run(x)["logits"])
    assert config["instance_group"][0]["count"] == 2
    assert described["instances"] == 2


def test_a_batch_waiting_behind_another_counts_its_wait_as_queue_time():
    import time

    from serving.stats import RequestTiming

    def run(images, steering):
        time.sleep(0.2)
        return {"y": images}

    async def main() -> list[RequestTiming]:
        batcher = MicroBatcher([run], max_batch=1, timeout_s=0.0)  # one instance: the 2nd batch waits on its thread
        await batcher.start()
        timings = [RequestTiming(), RequestTiming()]
        try:
            x = np.ones((1, 2), np.float32)
            await asyncio.gather(*(batcher.submit(x, NO_STEERING, 20.0, timing) for timing in timings))
        finally:
            await batcher.stop()
        return timings

    first, second = asyncio.run(main())
    assert 0.19 < first.compute_infer < 0.35 and 0.19 < second.compute_infer < 0.35  # the run alone
    assert first.queue < 0.1 and second.queue > 0.15  # waited for the first run
