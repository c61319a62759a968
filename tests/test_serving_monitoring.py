"""Drift monitoring flags exactly the sub-units whose firing really changes, and nothing on clean traffic."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from prometheus_client import generate_latest

from elude_export.export.contract import read_contract
from serving.monitoring import (FeatureMonitor, LayerWindow, _Block, at_least_from_bins, bins_from_at_least,
                                counts_at_least, psi)
from serving_fixtures import build_fixture_model, running_server, sample_inputs

SHIFT = 0.5  # red-channel colour cast (in normalised units)


@pytest.fixture(scope="module")
def fixture_model(tmp_path_factory):
    return build_fixture_model(tmp_path_factory.mktemp("monitoring") / "fixture.onnx")


@pytest.fixture(scope="module")
def contract(fixture_model):
    return read_contract(fixture_model.path)  # what a consumer holding only the file sees


@pytest.fixture(scope="module")
def ground_truth(fixture_model, contract):
    """Sub-units whose firing rate really moves under the shift (large sample), and those that do not."""
    outputs = fixture_model.forward(sample_inputs(10000, np.random.default_rng(99), SHIFT))
    changed, stable = set(), set()
    for info in contract.layers:
        baseline = contract.baseline[info.path]
        rate = (outputs[f"tap.{info.path}.max"] > baseline.threshold[np.asarray(info.unit)]).mean(0)
        delta = np.abs(rate - baseline.fire_rate)
        changed |= {info.subunits[c] for c in np.flatnonzero(delta > 0.2)}
        stable |= {info.subunits[c] for c in np.flatnonzero(delta < 0.03)}
    assert changed and stable
    return changed, stable


def stream(monitor: FeatureMonitor, fixture_model, shift: float, seed: int, images: int = 1024) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(images // 128):
        monitor.observe(fixture_model.forward(sample_inputs(128, rng, shift)))


def flagged(report: dict) -> set[str]:
    return {item["name"] for item in report["top"] if item["drifting"]}


def test_bins_match_a_histogram_of_searchsorted_right():
    rng = np.random.default_rng(0)
    quantiles = np.sort(rng.normal(size=(5, 9)), axis=1).astype(np.float32)
    quantiles[0, :4] = 0.0  # ties, as point masses at zero produce
    values = np.concatenate([rng.normal(size=(50, 5)), np.zeros((5, 5)), quantiles[:, :5].T]).astype(np.float32)
    index = np.stack([np.searchsorted(quantiles[s], values[:, s], side="right") for s in range(5)], axis=1)
    expected = np.stack([np.bincount(index[:, s], minlength=10) for s in range(5)])
    at_least = counts_at_least(values, np.ascontiguousarray(quantiles.T))
    bins = bins_from_at_least(len(values), at_least)
    np.testing.assert_array_equal(bins, expected)
    assert bins[0, 0] < len(values) and bins.sum() == 5 * len(values)
    np.testing.assert_array_equal(at_least_from_bins(bins), at_least)  # how a saved window is restored


def test_window_slides_and_counts_exactly():
    window = LayerWindow(n_subunits=3, n_bins=2, window=64)

    def summarise(rows: np.ndarray) -> _Block:  # every image fires and lies below the one cut point
        return _Block(len(rows), np.full(3, len(rows), np.int64), np.zeros((1, 3), np.int64),
                      rows.sum(0, dtype=np.float64))

    assert window.add(np.ones((250, 3), np.float32), summarise) == 750
    window.add(np.ones((50, 3), np.float32), summarise)
    total = window.total
    assert 64 <= total.n < 64 + window.block_size
    assert np.all(total.fires == total.n) and np.all(total.bins[:, 0] == total.n)
    assert np.all(total.act_sum == total.n)
    assert total.n == sum(block.n for block in window.blocks) + window.current.n


def test_psi_is_zero_for_the_baseline_itself():
    fraction = np.array([[0.1, 0.2, 0.3, 0.4]])
    assert psi(fraction * 10000, 10000, fraction)[0] < 1e-3
    assert psi(np.array([[0, 0, 0, 10000]]), 10000, fraction)[0] > 1.0


def test_unshifted_stream_stays_below_threshold(fixture_model, contract):
    monitor = FeatureMonitor(contract, window=1024)
    stream(monitor, fixture_model, 0.0, seed=1)
    report = monitor.drift(top=18)
    assert all(layer["ready"] for layer in report["layers"])
    assert flagged(report) == set()
    assert max(layer["psi_max"] for layer in report["layers"]) < 0.1


def test_shift_flags_the_subunits_whose_firing_changes(fixture_model, contract, ground_truth):
    changed, stable = ground_truth
    monitor = FeatureMonitor(contract, window=1024)
    stream(monitor, fixture_model, 0.0, seed=2)  # a clean window first, then the shift takes it over
    stream(monitor, fixture_model, SHIFT, seed=3, images=1152)
    report = monitor.drift(top=18)
    assert changed <= flagged(report)
    assert not (flagged(report) & stable)
    assert {item["name"] for item in report["top"][:len(changed)]} == changed  # ranked first by PSI
    text = generate_latest(monitor.registry).decode()
    for name in changed:
        assert f'subunit="{name}"' in text


def test_monitor_is_usable_without_the_server(fixture_model):
    code = ("import sys, serving.monitoring as m; "
            "print(sorted(x for x in ('fastapi', 'uvicorn', 'torch', 'serving.app') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    monitor = FeatureMonitor.from_onnx(fixture_model.path, top_n=3)
    seen = monitor.observe(fixture_model.forward(sample_inputs(16, np.random.default_rng(4))))
    text = generate_latest(monitor.registry).decode()
    assert seen == 16 and "elude_monitor_images_total 16.0" in text
    assert text.count("elude_subunit_fire_rate{") == 3  # top-N only: bounded label cardinality


def test_server_drift_endpoint_and_steered_traffic(fixture_model, ground_truth):
    tritonclient = pytest.importorskip("tritonclient.http")
    changed, _ = ground_truth
    rng = np.random.default_rng(11)
    with running_server(fixture_model.path, drift_window=512, max_batch=64) as (url, _app):
        client = tritonclient.InferenceServerClient(url.removeprefix("http://"))
        try:
            def send(shift: float, parameters=None):
                x = sample_inputs(64, rng, shift)
                tensor = tritonclient.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                client.infer("fixture", [tensor], parameters=parameters,
                             outputs=[tritonclient.InferRequestedOutput("logits")])

            for _ in range(4):  # steered traffic is an experiment: not part of the monitored distribution
                send(SHIFT, {"steer": {"blocks.0.mlp/0002.0": 0.5}})
            with httpx.Client(base_url=url, timeout=10) as http:
                assert all(layer["images"] == 0 for layer in http.get("/v1/monitoring/drift").json()["layers"])
                for _ in range(10):
                    send(SHIFT)
                deadline = time.monotonic() + 5  # observation runs off the response path: wait for it
                while True:
                    report = http.get("/v1/monitoring/drift", params={"top": 5}).json()
                    if min(layer["images"] for layer in report["layers"]) >= 512 or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                metrics = http.get("/metrics").text
        finally:
            client.close()
    assert report["model_name"] == "fixture"
    assert {item["name"] for item in report["top"][:len(changed)]} == changed
    assert all(item["drifting"] for item in report["top"][:len(changed)])
    assert 'elude_drift_subunits{layer="blocks.0.mlp"}' in metrics
    for name in changed:
        assert f'elude_drift_psi{{layer="{name.split("/")[0]}",subunit="{name}"}}' in metrics


def test_client_side_monitor_matches_the_server(fixture_model):
    """A Triton-style client feeding the taps it receives to FeatureMonitor sees the server's numbers."""
    tritonclient = pytest.importorskip("tritonclient.http")
    local = FeatureMonitor.from_onnx(fixture_model.path, window=256)
    rng = np.random.default_rng(21)
    with running_server(fixture_model.path, drift_window=256) as (url, _app):
        client = tritonclient.InferenceServerClient(url.removeprefix("http://"))
        try:
            taps = list(local.tap_of.values())
            for _ in range(6):
                x = sample_inputs(64, rng, SHIFT / 2)
                tensor = tritonclient.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                result = client.infer("fixture", [tensor], outputs=[tritonclient.InferRequestedOutput(t) for t in taps])
                local.observe({t: result.as_numpy(t) for t in taps})
        finally:
            client.close()
        with httpx.Client(base_url=url, timeout=10) as http:
            deadline = time.monotonic() + 5
            while True:
                served = http.get("/v1/monitoring/drift", params={"top": 18}).json()
                if served["layers"][0]["images"] == local.drift()["layers"][0]["images"] or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
    mine = local.drift(top=18)
    assert served["layers"] == mine["layers"]
    assert served["top"] == mine["top"]
