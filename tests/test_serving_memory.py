"""Small uploads cannot buy large memory: 64 maximal images in one request stay far below their decoded size.

A black 4096x4096 PNG is ~49 KB on the wire and 48 MB decoded; 64 of them decoded at once
would be 3 GB. Measured on a real server process (its peak RSS, VmHWM), since a thread would
share the test's memory.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serving_fixtures import build_fixture_model, subprocess_server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")
LIMIT_MB = 300


def memory_mb(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def black_png(size: int = 4096) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_64_maximal_pngs_in_one_request_stay_under_300_mb(tmp_path):
    fixture = build_fixture_model(tmp_path / "fixture.onnx")
    png = black_png()
    assert len(png) < 100_000
    small = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(small, format="PNG")
    with subprocess_server(fixture.path) as (url, process):
        with httpx.Client(base_url=url, timeout=120) as http:
            route = "/v1/models/fixture/image"
            assert http.post(route, files={"file": ("warm.png", small.getvalue())}).status_code == 200
            before = memory_mb(process.pid)["VmRSS"]
            response = http.post(route, files=[("file", (f"{i}.png", png)) for i in range(64)], data={"top_k": "1"})
            assert response.status_code == 200, response.text
            assert len(response.json()["predictions"]) == 64
            peak = memory_mb(process.pid)["VmHWM"]
    print(f"peak RSS increase {peak - before:.0f} MB for 64 x 4096x4096 PNG ({len(png)} bytes each)")
    assert peak - before < LIMIT_MB, f"peak RSS rose by {peak - before:.0f} MB"


def test_request_pixel_budget_is_413_before_decoding(tmp_path):
    fixture = build_fixture_model(tmp_path / "fixture.onnx")
    from serving.images import ImageDecoder
    from serving.errors import PayloadTooLarge

    png = black_png(1024)
    decoder = ImageDecoder(fixture.contract.input, 1024 * 1024, 3 * 1024 * 1024, slots=1)
    assert decoder([("a", png)] * 3).shape == (3, 3, 32, 32)
    with pytest.raises(PayloadTooLarge, match="per request"):
        decoder([("a", png)] * 4)
