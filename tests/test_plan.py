"""Plan round trip and refusal of corrupt, foreign and future plans."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from elude_export.errors import PlanError
from elude_export.models import create_embedded_model, embedded_input_spec
from elude_export.plan import SCHEMA_VERSION, load_plan, read_manifest
from elude_export.vocabulary import parse_subunit_name
from plan_factory import random_plan


@pytest.fixture()
def plan():
    torch.manual_seed(0)
    model = create_embedded_model(pretrained=False)
    made = random_plan(model, embedded_input_spec(), seed=1)
    made.layers[0].router_a = torch.randn(made.layers[0].split_units.numel() * made.layers[0].k_max, 8)
    made.layers[0].router_b = torch.randn(8, 96)
    made.layers[0].stats = {"threshold": torch.rand(384), "fire_rate": torch.rand(made.layers[0].n_subunits)}
    return made


def test_round_trip_keeps_every_tensor_and_setting(plan, tmp_path: Path) -> None:
    path = plan.save(tmp_path / "plan.safetensors")
    loaded = load_plan(path)
    assert loaded.fingerprint() == plan.fingerprint()
    assert loaded.model_fingerprint == plan.model_fingerprint and loaded.input_spec == plan.input_spec
    for ours, theirs in zip(plan.layers, loaded.layers):
        assert ours.tensors().keys() == theirs.tensors().keys()
        assert all(torch.equal(v, theirs.tensors()[k]) for k, v in ours.tensors().items())
        assert ours.subunit_names() == theirs.subunit_names()
    manifest = read_manifest(path)
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["layers"][0]["subunits"][:2] == plan.layers[0].subunit_names()[:2]
    assert not list(tmp_path.glob(".*.tmp")), "temp file left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "plan must get the usual file permissions"


def test_names_are_stable_and_parse_back(plan) -> None:
    names = plan.layers[1].subunit_names()
    assert len(names) == len(set(names)) == plan.layers[1].n_subunits
    assert names[0] == "blocks.1.mlp/0000.0"
    path, unit, sub = parse_subunit_name(names[-1])
    assert path == "blocks.1.mlp" and unit == 383 and sub == int(plan.layers[1].k[-1]) - 1
    with pytest.raises(PlanError):
        parse_subunit_name("no-slash")


def test_truncated_file_is_refused(plan, tmp_path: Path) -> None:
    path = plan.save(tmp_path / "plan.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PlanError, match="truncated|corrupt|readable"):
        load_plan(path)


def test_modified_tensors_are_refused(plan, tmp_path: Path) -> None:
    path = plan.save(tmp_path / "plan.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(PlanError, match="fingerprint"):
        load_plan(path)


def test_unknown_schema_and_foreign_files_are_refused(plan, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = plan.save(tmp_path / "plan.safetensors")
    manifest = read_manifest(path)
    manifest["schema_version"] = SCHEMA_VERSION + 1
    future = tmp_path / "future.safetensors"
    save_file({"x": torch.zeros(1)}, str(future), metadata={"manifest": json.dumps(manifest)})
    with pytest.raises(PlanError, match="schema version"):
        load_plan(future)
    foreign = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(PlanError, match="not an ELUDe plan"):
        load_plan(foreign)
    with pytest.raises(PlanError, match="not found"):
        load_plan(tmp_path / "missing.safetensors")


def test_save_refuses_bad_destinations(plan, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="does not exist"):
        plan.save(tmp_path / "no" / "such" / "plan.safetensors")
    with pytest.raises(PlanError, match="directory"):
        plan.save(tmp_path)


def test_schema_1_plans_load_with_their_single_context_for_every_layer(plan, tmp_path: Path) -> None:
    """Plans written before the context was chosen per layer keep working (and keep their fingerprint check)."""
    from safetensors.torch import load_file, save_file

    for layer in plan.layers:
        layer.context_token = "cls"
    path = plan.save(tmp_path / "plan.safetensors")
    manifest = read_manifest(path)
    manifest["schema_version"] = 1
    manifest["context_token"] = "cls"
    for entry in manifest["layers"]:
        del entry["context_token"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={"manifest": json.dumps(manifest),
                                                        "fingerprint": plan.fingerprint(schema_version=1)})
    loaded = load_plan(old)
    assert [layer.context_token for layer in loaded.layers] == ["cls"] * len(plan.layers)
    assert loaded.fingerprint(schema_version=1) == plan.fingerprint(schema_version=1)
    # the per-layer context is part of a schema 2 fingerprint: changing it is a different plan
    plan.layers[0].context_token = "mean"
    assert plan.fingerprint() != loaded.fingerprint()
