"""The HTML report: self-contained, images decode, and it renders in a real headless browser."""

from __future__ import annotations

import base64
import io
import os
import re
import stat
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from elude_export.cli import main
from elude_export.errors import DataError
from elude_export.evidence.evaluate import EvalConfig, evaluate
from elude_export.evidence.report import build_report, write_report
from elude_export.data.sources import open_source
from plan_factory import small_fitted_plan

LAYER = "blocks.3.mlp"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    loaded, plan = small_fitted_plan(seed=2, layer=LAYER, k_max=2)
    model = loaded.model
    source = open_source("embedded:test")
    result = evaluate(loaded, plan, source, EvalConfig(top_n=6, limit=96, bootstrap=30, sae_steps=20,
                                                       sae_batch_size=128, sae_tokens=2000, sae_limit=48, sae_k=8),
                      sae_source=open_source("embedded:calib"))
    folder = tmp_path_factory.mktemp("report")
    text = build_report(loaded, plan, source, result, max_units=3)
    path = write_report(text, folder / "report.html")
    checkpoint = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    return path, plan.save(folder / "plan.safetensors"), checkpoint


def embedded_pngs(text: str) -> list[bytes]:
    return [base64.b64decode(chunk) for chunk in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]


def test_report_is_self_contained_and_its_images_decode(report_file):
    path, _, _ = report_file
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", text), "no external resources (must open offline)"
    assert "<script" not in text
    pngs = embedded_pngs(text)
    # 2 summary plots + for each of 3 units: the unit and its 2 sub-units
    assert len(pngs) == 2 + 3 * 3
    for payload in pngs:
        image = Image.open(io.BytesIO(payload))
        image.load()
        assert image.width > 20 and image.height > 20
    for field in ("Summary", "label purity", "concept purity", "fires on", f"Layer {LAYER}", "bitwise equal: yes",
                  "label: <b>"):
        assert field in text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_report_renders_in_headless_chromium(report_file, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    path, _, _ = report_file
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                        "--window-size=1200,1600", path.as_uri()], capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.float32)
    assert pixels.std() > 10, "screenshot is blank"
    assert (pixels.reshape(-1, 3).std(1) > 30).mean() > 0.01, "no coloured content (images) rendered"

    # the browser itself must decode every embedded image: count them from a copy with a probe script
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text().replace("</body>", (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        "document.body.setAttribute('data-decoded', imgs.filter(i => i.complete && i.naturalWidth > 0).length"
        " + '/' + imgs.length); });</script></body>")))
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=120, check=False).stdout
    match = re.search(r'data-decoded="(\d+)/(\d+)"', dom)
    assert match, "probe did not run"
    assert match.group(1) == match.group(2) == str(len(embedded_pngs(path.read_text())))


def test_cli_report(report_file, tmp_path):
    _, plan_path, checkpoint = report_file
    out = tmp_path / "r.html"
    base = ["report", "--plan", str(plan_path), "--checkpoint", str(checkpoint), "--device", "cpu", "--no-sae",
            "--limit", "64", "--top-n", "4", "--bootstrap", "20", "--units", "2"]
    result = CliRunner().invoke(main, base + ["-o", str(out), "--order", "random"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and len(embedded_pngs(out.read_text())) == 2 + 2 * 3
    bad = CliRunner().invoke(main, base + ["-o", str(tmp_path / "missing" / "r.html")])
    assert bad.exit_code == 2 and bad.output.startswith("error:")
    bad_layer = CliRunner().invoke(main, base + ["-o", str(out), "--layer", "blocks.0.mlp"])
    assert bad_layer.exit_code == 2 and "plan has no layer" in bad_layer.output


def test_write_report_is_atomic_with_the_usual_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_report("<!DOCTYPE html><html></html>", tmp_path / "report.html")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # 0o666 & ~umask, not mkstemp's 0o600
        write_report("<!DOCTYPE html><html>again</html>", path)  # replaces the old report whole
    finally:
        os.umask(previous)
    assert path.read_text().endswith("again</html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temp file left behind
    with pytest.raises(DataError, match="does not exist"):
        write_report("x", tmp_path / "missing" / "report.html")
    with pytest.raises(DataError, match="is a directory"):
        write_report("x", tmp_path)
