"""The drift window and monitor counters survive a restart (same plan) and are refused for another plan."""

from __future__ import annotations

import logging

import httpx
import numpy as np

from serving.state import restore_state, save_state
from serving_fixtures import build_fixture_model, running_server, sample_inputs

INFER = "/v2/models/fixture/infer"


def feed(url: str, app, n_requests: int, shift: float = 0.0) -> None:
    rng = np.random.default_rng(0)
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(n_requests):
            x = sample_inputs(8, rng, shift)
            body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                "data": x.ravel().tolist()}]}
            assert http.post(INFER, json=body).status_code == 200
    assert app.state.elude.drain.wait_idle(5)


def test_restart_restores_the_window_and_counters(tmp_path):
    fixture = build_fixture_model(tmp_path / "fixture.onnx")
    state_file = tmp_path / "state" / "monitor.npz"
    with running_server(fixture.path, state_file=str(state_file), drift_window=256) as (url, app):
        feed(url, app, 20, shift=1.5)  # 160 drifted images
        before = app.state.elude.monitor.drift(top=5)
    assert state_file.is_file()  # written at shutdown
    with running_server(fixture.path, state_file=str(state_file), drift_window=256) as (url, app):
        monitor = app.state.elude.monitor
        after = monitor.drift(top=5)
        assert [layer["images"] for layer in after["layers"]] == [layer["images"] for layer in before["layers"]]
        assert [item["name"] for item in after["top"]] == [item["name"] for item in before["top"]]
        assert after["layers"][0]["drifting"] == before["layers"][0]["drifting"] > 0
        text = httpx.get(url + "/metrics").text
        assert "elude_monitor_images_total 160.0" in text
        feed(url, app, 1)
        assert monitor.drift()["layers"][0]["images"] == 168


def test_state_of_another_plan_is_refused(tmp_path, caplog):
    fixture = build_fixture_model(tmp_path / "a.onnx")
    other = build_fixture_model(tmp_path / "b.onnx", plan_fingerprint="q" * 16)
    from serving.monitoring import FeatureMonitor

    monitor = FeatureMonitor(fixture.contract, window=64)
    monitor.observe(fixture.forward(sample_inputs(32, np.random.default_rng(0))))
    save_state(tmp_path / "s.npz", monitor)
    fresh = FeatureMonitor(other.contract, window=64)
    with caplog.at_level(logging.WARNING, logger="elude.serving"):
        assert not restore_state(tmp_path / "s.npz", fresh)
    assert "refused" in caplog.text and "q" * 16 in caplog.text
    assert fresh.statistics()["blocks.0.mlp"]["n"] == 0
    same = FeatureMonitor(fixture.contract, window=64)
    assert restore_state(tmp_path / "s.npz", same)
    np.testing.assert_array_equal(same.statistics()["blocks.0.mlp"]["fire_rate"],
                                  monitor.statistics()["blocks.0.mlp"]["fire_rate"])
    (tmp_path / "broken.npz").write_bytes(b"not a state file")
    assert not restore_state(tmp_path / "broken.npz", FeatureMonitor(fixture.contract, window=64))
