"""`elude fit` / `inspect` end to end through click, and one-line errors for user mistakes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from elude_export.cli import main
from elude_export.models import create_embedded_model
from elude_export.plan import SCHEMA_VERSION, load_plan


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    save_file(create_embedded_model(pretrained=False).state_dict(), str(root / "random.safetensors"))
    images = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    np.save(root / "images.npy", images)
    return root


def _fit_args(root: Path, *extra: str) -> list[str]:
    return ["fit", "embedded", "--checkpoint", str(root / "random.safetensors"), "--data", str(root / "images.npy"),
            "--top-m", "16", "--k-rule", "fixed", "--k-max", "2", "--quiet", *extra]


def test_fit_then_inspect(workspace: Path) -> None:
    runner = CliRunner()
    plan_path = workspace / "plan.safetensors"
    result = runner.invoke(main, _fit_args(workspace, "--layers", "blocks.1.mlp,blocks.3.mlp", "-o", str(plan_path)))
    assert result.exit_code == 0, result.output
    plan = load_plan(plan_path)
    assert [layer.path for layer in plan.layers] == ["blocks.1.mlp", "blocks.3.mlp"]
    assert plan.n_subunits == 2 * 384 * 2
    shown = runner.invoke(main, ["inspect", str(plan_path)])
    assert shown.exit_code == 0 and "blocks.3.mlp" in shown.output and "K2:384" in shown.output
    as_json = runner.invoke(main, ["inspect", str(plan_path), "--json"])
    assert f'"schema_version": {SCHEMA_VERSION}' in as_json.output


@pytest.mark.parametrize("args, message", [
    (["fit", "no_such_model_xyz"], "unknown model"),
    (["fit", "embedded", "--checkpoint", "/nonexistent.safetensors"], "checkpoint not found"),
    (["fit", "embedded", "--data", "/nonexistent/images"], "data not found"),
    (["fit", "embedded", "-o", "/nonexistent/dir/plan.safetensors"], "does not exist"),
    (["inspect", "/nonexistent.safetensors"], "plan not found"),
])
def test_user_errors_are_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_corrupt_checkpoint_and_wrong_layers(workspace: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    result = runner.invoke(main, ["fit", "embedded", "--checkpoint", str(corrupt)])
    assert result.exit_code == 2 and "cannot read checkpoint" in result.output
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    result = runner.invoke(main, ["fit", "embedded", "--checkpoint", str(other)])
    assert result.exit_code == 2 and "does not fit the model" in result.output
    result = runner.invoke(main, _fit_args(workspace, "--layers", "blocks.*.attn.qkv", "-o", str(tmp_path / "p")))
    assert result.exit_code == 2 and "not a neuron layer" in result.output
    assert not (tmp_path / "p").exists()
