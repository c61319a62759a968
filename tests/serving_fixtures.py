"""A tiny ELUDe-shaped ONNX model built with onnx.helper, for serving tests without the exporter.

input (N,3,32,32) -> Flatten -> layer blocks.0.mlp: u0 = Relu(x W0 + b0) * steer0   (10 sub-units)
                              -> layer blocks.1.mlp: u1 = Relu(u0 W1 + b1) * steer1  (8 sub-units)
                              -> logits = u1 W2 + b2 (N,4)
Taps: `tap.<layer>.max` = u (the sub-unit activations), `tap.blocks.0.mlp.mean` = u0 / 2.
`steer.<layer>` are graph inputs backed by initializers of ones (omitted = no steering).

Layer-0 sub-units in `CHANNEL0_COLUMNS` read the red channel with a positive mean weight; all
other layer-0 columns have zero-sum weights on every channel, so a uniform red shift of the
input (`sample_inputs(shift=...)`) changes exactly the firing of the former (and whatever they
feed in layer 1) — the ground truth for drift tests. The baseline is computed like fit.py does.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from elude_export.export.contract import INPUT_NAME, LayerBaseline, LayerInfo, OnnxContract, SubunitLabel, TapInfo
from elude_export.vocabulary import steer_input_name, tap_output_name

QUANTILE_LEVELS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
THRESHOLD_QUANTILE = 0.75
LAYERS = {"blocks.0.mlp": [2, 2, 1, 2, 1, 2], "blocks.1.mlp": [2, 1, 2, 2, 1]}  # K per unit
CHANNEL0_COLUMNS = (0, 3, 7)
SPEC = {"channels": 3, "height": 32, "width": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
N_CLASSES = 4


@dataclass
class FixtureModel:
    path: Path
    contract: OnnxContract
    weights: dict[str, np.ndarray]

    def forward(self, images: np.ndarray, steer: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The graph's computation in numpy (ground truth for tests)."""
        steer = steer or {}
        w = self.weights
        x = images.reshape(len(images), -1)
        u0 = np.maximum(x @ w["W0"] + w["b0"], 0) * steer.get("blocks.0.mlp", 1.0)
        u1 = np.maximum(u0 @ w["W1"] + w["b1"], 0) * steer.get("blocks.1.mlp", 1.0)
        return {"logits": u1 @ w["W2"] + w["b2"], tap_output_name("blocks.0.mlp", "max"): u0,
                tap_output_name("blocks.1.mlp", "max"): u1, tap_output_name("blocks.0.mlp", "mean"): u0 / 2}


def columns(ks: list[int]) -> tuple[list[int], list[int]]:
    unit = [j for j, k in enumerate(ks) for _ in range(k)]
    sub = [s for k in ks for s in range(k)]
    return unit, sub


def sample_inputs(n: int, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    """Normalised inputs; `shift` adds a constant to the red channel (a colour cast)."""
    x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
    x[:, 0] += shift
    return x


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    d = 3 * 32 * 32
    s0, s1 = sum(LAYERS["blocks.0.mlp"]), sum(LAYERS["blocks.1.mlp"])
    w0 = rng.standard_normal((3, 32 * 32, s0)) / np.sqrt(d)
    w0 -= w0.mean(axis=1, keepdims=True)  # zero-sum per channel: blind to uniform colour shifts
    w0[0, :, list(CHANNEL0_COLUMNS)] += 1.5 / (32 * 32)  # ...except these, which see red
    return {
        "W0": w0.reshape(d, s0).astype(np.float32),
        "b0": rng.normal(0.0, 0.3, s0).astype(np.float32),
        "W1": (rng.standard_normal((s0, s1)) / np.sqrt(s0)).astype(np.float32),
        "b1": rng.normal(0.2, 0.2, s1).astype(np.float32),
        "W2": (rng.standard_normal((s1, N_CLASSES))).astype(np.float32),
        "b2": np.zeros(N_CLASSES, np.float32),
    }


def _graph(weights: dict[str, np.ndarray]) -> onnx.GraphProto:
    s0, s1 = weights["W0"].shape[1], weights["W1"].shape[1]
    steer0, steer1 = steer_input_name("blocks.0.mlp"), steer_input_name("blocks.1.mlp")
    tap0, tap1 = tap_output_name("blocks.0.mlp", "max"), tap_output_name("blocks.1.mlp", "max")
    mean0 = tap_output_name("blocks.0.mlp", "mean")
    nodes = [
        helper.make_node("Flatten", [INPUT_NAME], ["x"], axis=1),
        helper.make_node("MatMul", ["x", "W0"], ["z0"]),
        helper.make_node("Add", ["z0", "b0"], ["a0"]),
        helper.make_node("Relu", ["a0"], ["h0"]),
        helper.make_node("Mul", ["h0", steer0], ["u0"]),
        helper.make_node("Identity", ["u0"], [tap0]),
        helper.make_node("Mul", ["u0", "half"], [mean0]),
        helper.make_node("MatMul", ["u0", "W1"], ["z1"]),
        helper.make_node("Add", ["z1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["h1"]),
        helper.make_node("Mul", ["h1", steer1], ["u1"]),
        helper.make_node("Identity", ["u1"], [tap1]),
        helper.make_node("MatMul", ["u1", "W2"], ["z2"]),
        helper.make_node("Add", ["z2", "b2"], ["logits"]),
    ]
    initializers = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    initializers += [numpy_helper.from_array(np.ones(s0, np.float32), steer0),
                     numpy_helper.from_array(np.ones(s1, np.float32), steer1),
                     numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, 32, 32]),
              helper.make_tensor_value_info(steer0, TensorProto.FLOAT, [s0]),
              helper.make_tensor_value_info(steer1, TensorProto.FLOAT, [s1])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", N_CLASSES]),
               helper.make_tensor_value_info(tap0, TensorProto.FLOAT, ["batch", s0]),
               helper.make_tensor_value_info(tap1, TensorProto.FLOAT, ["batch", s1]),
               helper.make_tensor_value_info(mean0, TensorProto.FLOAT, ["batch", s0])]
    return helper.make_graph(nodes, "elude_fixture", inputs, outputs, initializers)


def baseline_of(values: np.ndarray, unit: list[int], n_units: int) -> LayerBaseline:
    """Calibration statistics as fit.py computes them (unit activation = max of its sub-units here)."""
    unit_idx = np.asarray(unit)
    unit_max = np.stack([values[:, unit_idx == j].max(1) for j in range(n_units)], axis=1)
    threshold = np.quantile(unit_max, THRESHOLD_QUANTILE, axis=0)
    quantiles = np.quantile(values, QUANTILE_LEVELS, axis=0).T  # (S, L)
    bins = np.stack([np.searchsorted(quantiles[s], values[:, s], side="right") for s in range(values.shape[1])])
    fraction = np.stack([np.bincount(row, minlength=len(QUANTILE_LEVELS) + 1) / len(row) for row in bins])
    return LayerBaseline(threshold=threshold.astype(np.float32), fire_rate=(values > threshold[unit_idx]).mean(0),
                         mean=values.mean(0), quantiles=quantiles.astype(np.float32), bin_fraction=fraction)


def build_fixture_model(path: str | Path, seed: int = 0, n_calibration: int = 4000,
                        model_name: str = "fixture", labels: dict[str, str] | None = None,
                        plan_fingerprint: str = "p" * 16) -> FixtureModel:
    """Write the tiny model with full ELUDe metadata (baseline from `n_calibration` inputs) to `path`.

    `labels` ({sub-unit name: text}) fills `contract.labels` as `elude label` would.
    """
    rng = np.random.default_rng(seed)
    weights = _weights(rng)
    layers, baselines = [], {}
    for path_name, ks in LAYERS.items():
        unit, sub = columns(ks)
        names = [f"{path_name}/{j:04d}.{k}" for j, k in zip(unit, sub)]
        layers.append(LayerInfo(path_name, len(ks), len(unit), steer_input_name(path_name), names, unit, sub))
    taps = [TapInfo(tap_output_name(p, "max"), p, "max") for p in LAYERS] + [
        TapInfo(tap_output_name("blocks.0.mlp", "mean"), "blocks.0.mlp", "mean")]
    contract = OnnxContract(model_name=model_name, model_fingerprint="f" * 16, plan_fingerprint=plan_fingerprint,
                            input=SPEC, outputs=["logits"], router="context", layers=layers, taps=taps,
                            quantile_levels=list(QUANTILE_LEVELS), versions={"exporter": "tests/serving_fixtures"})
    fixture = FixtureModel(Path(path), contract, weights)
    calibration = fixture.forward(sample_inputs(n_calibration, rng))
    for info in layers:
        baselines[info.path] = baseline_of(calibration[tap_output_name(info.path, "max")], info.unit, info.n_units)
    contract.baseline = baselines
    contract.labels = {name: SubunitLabel(text=text) for name, text in (labels or {}).items()}
    model = helper.make_model(_graph(weights), opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="elude-tests")
    model.ir_version = 8
    helper.set_model_props(model, contract.to_metadata_props())
    onnx.checker.check_model(model)
    fixture.path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(fixture.path))
    return fixture


def png_bytes(rng: np.random.Generator, size: tuple[int, int] = (40, 48), fmt: str = "PNG") -> bytes:
    from PIL import Image

    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@contextmanager
def running_server(model_path: str | Path, runtime=None, **options) -> Iterator[tuple[str, object]]:
    """(base url, app) of a real uvicorn server on a free 127.0.0.1 port; always shut down."""
    from serving.app import create_app
    from serving.config import ServeConfig
    from serving.server import BackgroundServer

    config = ServeConfig(model_path=Path(model_path), port=0, log_level="warning", **options)
    app = create_app(config, runtime)
    with BackgroundServer(app, config) as url:
        yield url, app


@contextmanager
def subprocess_server(model_path: str | Path, *flags: str, start_timeout_s: float = 60.0,
                      env: dict[str, str] | None = None) -> Iterator[tuple[str, "subprocess.Popen"]]:
    """(base url, process) of `python -m serving MODEL` on a free port; killed if still running at exit.

    For what a thread cannot show: process memory, signals, a real restart.
    """
    import os
    import subprocess
    import sys
    import time

    import httpx

    from serving.server import free_port

    port = free_port()
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "serving", str(model_path), "--port", str(port), "--log-level", "warning",
               *flags]
    process = subprocess.Popen(command, cwd=root, env={**os.environ, **(env or {})},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}: {process.stdout.read().decode()}")
            try:
                ready = httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                ready = False  # not listening yet
            if ready:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start on {url}")
            time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stdout.close()
