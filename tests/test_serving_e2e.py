"""End to end: fit the embedded ViT, export it with `export_onnx`, serve the file, query it with tritonclient.

Uses the bundled trained weights when present (elude_export/data/embedded_vit.safetensors);
otherwise the same architecture untrained, which still exercises fit -> export -> serve.
"""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch

tritonclient = pytest.importorskip("tritonclient.http")
onnx_export = pytest.importorskip("elude_export.export.onnx_export", reason="the ONNX exporter is not there yet")

from elude_export.fitting.fit import FitConfig, fit  # noqa: E402
from elude_export.models import normalize_images  # noqa: E402
from elude_export.models import (EMBEDDED_WEIGHTS, LoadedModel, create_embedded_model,  # noqa: E402
                                 embedded_input_spec, load_model)
from elude_export.data.sources import open_source  # noqa: E402
from serving_fixtures import running_server  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    if EMBEDDED_WEIGHTS.is_file():
        loaded = load_model("embedded")
    else:
        loaded = LoadedModel(create_embedded_model(pretrained=False), "embedded-untrained", embedded_input_spec(), 4)
    source = open_source("embedded:calib")
    config = FitConfig(limit=256, top_m=64, stats_images=512, k_rule="fixed", k_max=2, n_init=1, n_iter=10)
    plan = fit(loaded, source, config).plan
    path = onnx_export.export_onnx(loaded, plan, tmp_path_factory.mktemp("e2e") / "embedded.onnx")
    return loaded, plan, path, source


def test_served_export_matches_pytorch_and_onnxruntime(exported):
    loaded, plan, path, source = exported
    images = source.load(np.arange(512, 520))
    x = normalize_images(images, loaded.input_spec).numpy()
    direct = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference = loaded.model(torch.from_numpy(x)).numpy()
    with running_server(path) as (url, _app):
        client = tritonclient.InferenceServerClient(url.removeprefix("http://"))
        try:
            metadata = client.get_model_metadata(loaded.name)
            taps = [t["output"] for t in metadata["elude"]["taps"]]
            assert taps and all(t in {o["name"] for o in metadata["outputs"]} for t in taps)
            tensor = tritonclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = client.infer(loaded.name, [tensor])
            expected = dict(zip([o.name for o in direct.get_outputs()], direct.run(None, {"input": x})))
            for name, value in expected.items():
                np.testing.assert_array_equal(result.as_numpy(name), value, err_msg=name)
            # the rewrite is lossless: served logits are the original PyTorch model's
            np.testing.assert_allclose(result.as_numpy("logits"), reference, rtol=1e-4, atol=1e-4)

            layer = plan.layers[-1]
            name = layer.subunit_names()[0]
            steered = client.infer(loaded.name, [tensor], parameters={"steer": {name: 0.0}})
            assert not np.array_equal(steered.as_numpy("logits"), result.as_numpy("logits")) or \
                np.all(result.as_numpy(f"tap.{layer.path}.max")[:, 0] == 0)
        finally:
            client.close()


def test_image_route_and_drift_on_calibration_traffic(exported):
    from PIL import Image

    loaded, plan, path, source = exported
    png = io.BytesIO()
    Image.fromarray(source.load(np.arange(600, 601))[0]).save(png, format="PNG")
    with running_server(path, drift_window=256, max_batch=64) as (url, _app):
        with httpx.Client(base_url=url, timeout=30) as http:
            answer = http.post(f"/v1/models/{loaded.name}/image", files={"file": ("x.png", png.getvalue())})
            assert answer.status_code == 200, answer.text
            prediction = answer.json()["predictions"][0]
            assert len(prediction["classes"]) == min(5, loaded.num_classes)
            names = {n for layer in plan.layers for n in layer.subunit_names()}
            assert prediction["subunits"] and all(s["name"] in names for s in prediction["subunits"])
            report = stream_and_report(http, loaded, source, lambda images: images)  # unseen, same distribution
    assert all(layer["ready"] for layer in report["layers"])
    assert sum(layer["drifting"] for layer in report["layers"]) == 0, report["top"][:5]


def test_darkened_traffic_drifts(exported):
    loaded, _plan, path, source = exported
    with running_server(path, drift_window=256, max_batch=64) as (url, _app):
        with httpx.Client(base_url=url, timeout=30) as http:
            report = stream_and_report(http, loaded, source, lambda images: (images * 0.5).astype(np.uint8))
    flagged = [layer["drifting"] for layer in report["layers"]]
    assert sum(count > 0 for count in flagged) >= len(flagged) / 2, report["layers"]
    assert report["top"][0]["drifting"], report["top"][:3]


def stream_and_report(http: httpx.Client, loaded, source, transform) -> dict:
    """Serve 256 calibration-source images (after `transform`) over v2 JSON; the drift report once seen."""
    for start in range(1024, 1024 + 256, 64):
        x = normalize_images(transform(source.load(np.arange(start, start + 64))), loaded.input_spec).numpy()
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}], "outputs": [{"name": "logits"}]}
        assert http.post(f"/v2/models/{loaded.name}/infer", json=body).status_code == 200
    deadline = time.monotonic() + 10
    while True:
        report = http.get("/v1/monitoring/drift").json()
        if min(layer["images"] for layer in report["layers"]) >= 256 or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


def test_triton_style_per_image_steer_export_serves(exported, tmp_path):
    """The Triton copy (steer inputs (steer_batch, S)) is servable too; named steering maps onto it."""
    loaded, plan, _path, source = exported
    from elude_export.export.options import ExportOptions

    path = onnx_export.export_onnx(loaded, plan, tmp_path / "per_image.onnx",
                                   options=ExportOptions(steer_layout="per_image"))
    x = normalize_images(source.load(np.arange(700, 704)), loaded.input_spec).numpy()
    layer = plan.layers[0]
    steer = np.ones((1, layer.n_subunits), np.float32)
    steer[0, 0] = 0.0
    direct = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = direct.run(["logits"], {"input": x, f"steer.{layer.path}": steer})[0]
    with running_server(path) as (url, _app):
        client = tritonclient.InferenceServerClient(url.removeprefix("http://"))
        try:
            tensor = tritonclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            by_name = client.infer(loaded.name, [tensor], parameters={"steer": {layer.subunit_names()[0]: 0.0}})
            rows = np.repeat(steer, len(x), axis=0)  # what a Triton client sends: one row per image
            steer_tensor = tritonclient.InferInput(f"steer.{layer.path}", list(rows.shape), "FP32")
            steer_tensor.set_data_from_numpy(rows)
            by_tensor = client.infer(loaded.name, [tensor, steer_tensor])
            rows[1::2] = 1.0  # different steering per image: served as its own batch
            steer_tensor.set_data_from_numpy(rows)
            per_image = client.infer(loaded.name, [tensor, steer_tensor])
        finally:
            client.close()
    np.testing.assert_array_equal(by_name.as_numpy("logits"), expected)
    np.testing.assert_array_equal(by_tensor.as_numpy("logits"), expected)
    expected_rows = direct.run(["logits"], {"input": x, f"steer.{layer.path}": rows})[0]
    np.testing.assert_array_equal(per_image.as_numpy("logits"), expected_rows)
