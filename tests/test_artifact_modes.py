"""Every export writer leaves the usual permissions (0644 files, 0755 folders under umask 022).

A Triton server or a colleague running as another user must be able to read what `elude
export` / `elude validate` write; temp files and folders are owner-only (0600 / 0700) until
the atomic-write helpers fix their mode.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from elude_export.export.onnx_export import export_onnx
from elude_export.export.options import ExportOptions
from elude_export.export.triton import write_triton_repository
from elude_export.export.validate import validate_export

from test_onnx_export import embedded_model_and_plan


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """A fast (TorchScript) one-layer export, its weights in a separate `.data` file."""
    previous = os.umask(0o022)
    try:
        loaded, plan = embedded_model_and_plan()
        folder = tmp_path_factory.mktemp("modes")
        path = export_onnx(loaded, plan, folder / "model.onnx", taps=f"{plan.layers[0].path}:max",
                           options=ExportOptions(exporter="torchscript"), external_data=True)
    finally:
        os.umask(previous)
    return loaded, plan, path


def test_onnx_and_its_data_file_get_the_usual_mode(small_export):
    _, _, path = small_export
    assert mode(path) == 0o644
    assert mode(path.with_name("model.onnx.data")) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]  # no scratch left


def test_validation_report_gets_the_usual_mode(small_export, tmp_path, umask_022):
    loaded, plan, path = small_export
    report = validate_export(loaded, plan, path, None, provider="cpu", n_random=2, check_steering=False)
    written = report.write_json(tmp_path / "validation.json")
    assert mode(written) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["validation.json"]


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_triton_repository_gets_the_usual_modes(small_export, tmp_path, umask_022, backend):
    _, _, path = small_export
    repo = tmp_path / "repo"
    folder = write_triton_repository(path, repo, name="elude", backend=backend, max_batch_size=0)
    assert folder == repo / "elude"
    for directory in (repo, folder, folder / "1"):
        assert mode(directory) == 0o755, directory
    files = [p for p in folder.rglob("*") if p.is_file()]
    expected = {"config.pbtxt", "model.onnx", "model.onnx.data"} | ({"model.py"} if backend == "python" else set())
    assert {p.name for p in files} == expected
    assert all(mode(p) == 0o644 for p in files), {p.name: oct(mode(p)) for p in files}
    rewritten = write_triton_repository(path, repo, name="elude", backend=backend, max_batch_size=0)
    assert mode(rewritten) == 0o755 and mode(rewritten / "1") == 0o755  # a replacement too
    assert sorted(p.name for p in repo.iterdir()) == ["elude"]  # no staging or old folder left
