"""Steering a sub-unit acts only where it is routed; steering its unit acts everywhere."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from elude_export.cli import main
from elude_export.errors import PlanError
from elude_export.rewrite import apply_plan, disentangled_layers, reset_steers, set_steers
from elude_export.data.sources import open_source
from plan_factory import small_fitted_plan
from elude_export.evidence.steering import resolve_subunit, steer_effect

LAYER = "blocks.2.mlp"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def steer_run(tmp_path_factory):
    loaded, plan = small_fitted_plan(seed=1, layer=LAYER, k_max=3)
    model = loaded.model
    folder = tmp_path_factory.mktemp("steer")
    checkpoint = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    return loaded, plan, checkpoint, plan.save(folder / "plan.safetensors")


@torch.no_grad()
def test_ablating_a_subunit_changes_outputs_only_where_it_is_routed(steer_run):
    loaded, plan, _, _ = steer_run
    source = open_source("embedded:test").subset(torch.arange(96).numpy())
    batch = torch.cat([b for _, b in _batches(source, loaded)])
    model = apply_plan(loaded.model, plan, layers=[LAYER])
    layer = disentangled_layers(model)[LAYER]
    routes = []
    hook = layer.router.register_forward_hook(lambda _m, _i, out: routes.append(out))
    base = model(batch)
    hook.remove()
    route = routes[-1]  # (images, units): context router, one route per image and unit
    # a unit whose routes are spread over its sub-units on these images
    unit = int(max(range(route.shape[1]), key=lambda j: min(int((route[:, j] == s).sum()) for s in range(2))))
    sub = 0
    routed = route[:, unit] == sub
    assert 0 < int(routed.sum()) < len(batch)
    names = [f"{LAYER}/{unit:04d}.{s}" for s in range(int(plan.layers[0].k[unit]))]

    set_steers(model, {names[sub]: 0.0})
    ablated = model(batch)
    changed = (ablated != base).any(1)
    assert bool(changed[routed].all()), "ablation must act on every image routed to the sub-unit"
    assert not bool(changed[~routed].any()), "images routed to siblings must stay bitwise unchanged"

    reset_steers(model)
    set_steers(model, {name: 0.0 for name in names})
    whole = model(batch)
    assert bool((whole != base).any(1).all()), "ablating the whole unit acts on every image"

    reset_steers(model)
    assert torch.equal(model(batch), loaded.model(batch))


def _batches(source, loaded):
    from elude_export.models import model_batches

    return model_batches(source, loaded.input_spec, 32, torch.device("cpu"), torch.float32)


def test_steer_effect_groups_agree_with_the_routing(steer_run):
    loaded, plan, _, _ = steer_run
    source = open_source("embedded:test")
    name = f"{LAYER}/0005.1"
    single = steer_effect(loaded, plan, name, 0.0, source, limit=96, batch_size=48)
    routed, siblings = single.groups[1], single.groups[2]
    assert routed.images + siblings.images == 96
    if routed.images:
        assert routed.changed == 1.0
    assert siblings.changed == 0.0 and siblings.total_variation == 0.0
    whole = steer_effect(loaded, plan, name, 0.0, source, whole_unit=True, limit=96, batch_size=48)
    assert len(whole.subunits) == int(plan.layers[0].k[5])
    assert whole.groups[2].images == 0 or whole.groups[2].changed == 1.0
    neutral = steer_effect(loaded, plan, name, 1.0, source, limit=32)
    assert all(group.changed == 0.0 for group in neutral.groups)
    assert "routed to siblings only" in single.table()


def test_resolve_subunit_rejects_unknown_names(steer_run):
    _, plan, _, _ = steer_run
    for bad in ("blocks.2.mlp/9999.0", "blocks.2.mlp/0001.7", "blocks.9.mlp/0001.0", "not-a-name"):
        with pytest.raises(PlanError):
            resolve_subunit(plan, bad)


def test_cli_steer(steer_run):
    _, _, checkpoint, plan_path = steer_run
    runner = CliRunner()
    base = ["steer", "--plan", str(plan_path), "--checkpoint", str(checkpoint), "--device", "cpu"]
    ok = runner.invoke(main, base + ["--subunit", f"{LAYER}/0003.2", "--scale", "0", "--limit", "40"])
    assert ok.exit_code == 0, ok.output
    assert "routed to siblings only" in ok.output
    for args, message in [
        (["--subunit", f"{LAYER}/0003.9"], "unknown sub-unit"),
        (["--subunit", "blocks.7.mlp/0003.0"], "plan has no layer"),
        (["--subunit", f"{LAYER}/0003.0", "--data", "missing.npz"], "data not found"),
    ]:
        result = runner.invoke(main, base + args)
        assert result.exit_code == 2 and result.output.startswith("error:") and message in result.output, result.output
    missing = runner.invoke(main, ["steer", "--plan", "nope.safetensors", "--subunit", f"{LAYER}/0003.0"])
    assert missing.exit_code == 2 and "plan not found" in missing.output
