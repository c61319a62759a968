"""ONNX export: taps, steer inputs, metadata contract, atomic writes, the CLI's error paths."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from elude_export.cli import main
from elude_export.errors import ExportError
from elude_export.fitting.fit import FitConfig, fit
from elude_export.models import (
    EMBEDDED_WEIGHTS,
    LoadedModel,
    create_embedded_model,
    embedded_input_spec,
    load_model,
)
from elude_export.export.contract import read_contract
from elude_export.vocabulary import steer_input_name, tap_output_name
from elude_export.export.onnx_export import export_onnx, parse_taps
from elude_export.export.options import ExportOptions
from elude_export.rewrite import (
    apply_plan,
    configure_layer_taps,
    disentangled_layers,
    read_taps,
    reset_steers,
    set_steers,
)
from elude_export.data.sources import ArraySource, open_source

ATOL, RTOL = 1e-5, 1e-4


@functools.lru_cache(maxsize=None)
def embedded_model_and_plan(router: str = "context", rank: int | None = 16):
    """The committed embedded model on its calibration images, or (before it exists) a seeded random one.

    Cached: the test modules share one fit per setting (callers copy before changing anything).
    """
    if EMBEDDED_WEIGHTS.is_file():
        loaded = load_model("embedded")
        source = open_source("embedded:calib").subset(np.arange(128))
    else:
        torch.manual_seed(0)
        loaded = LoadedModel(create_embedded_model(pretrained=False), "embedded", embedded_input_spec(), 4)
        images = np.random.default_rng(0).integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
        source = ArraySource("random", 128, images=images)
    config = FitConfig(router=router, top_m=64, k_rule="fixed", k_max=3, router_rank=rank, stats_images=128)
    return loaded, fit(loaded, source, config).plan


def held_out_batch(loaded: LoadedModel, n: int) -> torch.Tensor:
    from elude_export.models import normalize_images

    if EMBEDDED_WEIGHTS.is_file() and loaded.name == "embedded":
        images = open_source("embedded:test").load(np.arange(n))
    else:
        spec = loaded.input_spec
        images = np.random.default_rng(1).integers(0, 256, (n, spec.height, spec.width, 3), dtype=np.uint8)
    return normalize_images(images, loaded.input_spec)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def setup():
    return embedded_model_and_plan()


@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory):
    """One export shared by most tests: every layer, max+mean taps, a token tap, steerable."""
    loaded, plan = setup
    last = plan.layers[-1].path
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export_onnx(loaded, plan, path, taps=["all:max,mean", f"{last}:tokens"])
    return path


def test_checker_and_interface(exported, setup):
    loaded, plan = setup
    onnx.checker.check_model(str(exported), full_check=True)  # includes strict shape inference
    model = onnx.load(str(exported))
    inputs = {value.name: value for value in model.graph.input}
    outputs = [value.name for value in model.graph.output]
    assert outputs[0] == "logits"
    expected_taps = [tap_output_name(l.path, p) for l in plan.layers for p in ("max", "mean")]
    assert set(expected_taps) <= set(outputs)
    assert tap_output_name(plan.layers[-1].path, "tokens") in outputs
    initializers = {init.name for init in model.graph.initializer}
    for layer in plan.layers:
        name = steer_input_name(layer.path)
        assert name in inputs and name in initializers  # an input with a default: overridable
        assert [d.dim_value for d in inputs[name].type.tensor_type.shape.dim] == [layer.n_subunits]
    batch_dim = inputs["input"].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_equals_pytorch(exported, setup, batch):
    loaded, plan = setup
    x = held_out_batch(loaded, batch)
    with torch.no_grad():
        reference = loaded.model(x).numpy()
        rewritten = apply_plan(loaded.model, plan, poolings=("max", "mean"))
        configure_layer_taps(rewritten, {l.path: ("max", "mean") for l in plan.layers}
                             | {plan.layers[-1].path: ("max", "mean", "tokens")})
        rewritten(x)
        taps = {k: v.numpy() for k, v in read_taps(rewritten).items()}
    sess = session(exported)
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, {"input": x.numpy()})))
    np.testing.assert_allclose(values["logits"], reference, atol=ATOL, rtol=RTOL)
    assert (values["logits"].argmax(1) == reference.argmax(1)).all()
    for name, value in taps.items():
        assert values[name].shape == value.shape
        np.testing.assert_allclose(values[name], value, atol=ATOL, rtol=RTOL, err_msg=name)


def test_default_steers_equal_feeding_ones(exported, setup):
    loaded, plan = setup
    x = held_out_batch(loaded, 3).numpy()
    sess = session(exported)
    default = sess.run(["logits"], {"input": x})[0]
    ones = {steer_input_name(l.path): np.ones(l.n_subunits, np.float32) for l in plan.layers}
    np.testing.assert_array_equal(sess.run(["logits"], {"input": x, **ones})[0], default)


def test_zeroing_a_steer_matches_pytorch(exported, setup):
    loaded, plan = setup
    contract = read_contract(exported)
    layer = contract.layers[1]
    split = [c for c, unit in enumerate(layer.unit) if layer.unit.count(unit) > 1]
    x = held_out_batch(loaded, 8)
    rewritten = apply_plan(loaded.model, plan, poolings=())
    sess = session(exported)
    baseline = sess.run(["logits"], {"input": x.numpy()})[0]
    changed = False
    for column in split[:6]:
        steer = np.ones(layer.n_subunits, np.float32)
        steer[column] = 0.0
        onnx_logits = sess.run(["logits"], {"input": x.numpy(), layer.steer_input: steer})[0]
        set_steers(rewritten, {layer.subunits[column]: 0.0})
        with torch.no_grad():
            torch_logits = rewritten(x).numpy()
        reset_steers(rewritten)
        np.testing.assert_allclose(onnx_logits, torch_logits, atol=ATOL, rtol=RTOL)
        changed |= bool(np.abs(onnx_logits - baseline).max() > 0)
    assert changed, "no zeroed sub-unit changed the output: the check would be vacuous"


def test_metadata_names_every_column(exported, setup):
    _, plan = setup
    contract = read_contract(exported)  # from the file alone
    assert contract.model_fingerprint == plan.model_fingerprint
    assert contract.plan_fingerprint == plan.fingerprint()
    assert contract.outputs == ["logits"]
    assert contract.export.mode == "fused" and contract.export.steer_layout == "shared"
    assert contract.versions["opset"] == 18 and contract.versions["exporter"] in ("dynamo", "torchscript")
    model = onnx.load(str(exported), load_external_data=False)
    shapes = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    index = contract.subunit_index()
    for tap in contract.taps:
        info = contract.layer(tap.layer)
        assert len(info.subunits) == shapes[tap.output][-1] == info.n_subunits
        assert all(index[name] == (tap.layer, column) for column, name in enumerate(info.subunits))
    for layer in plan.layers:
        info = contract.layer(layer.path)
        assert info.subunits == layer.subunit_names()
        parent, sub = layer.columns()
        assert info.unit == parent.tolist() and info.sub == sub.tolist()
        np.testing.assert_allclose(contract.baseline[layer.path].fire_rate, layer.stats["fire_rate"].numpy(), atol=1e-6)


def test_only_tapped_layers_are_rewritten(setup, tmp_path):
    loaded, plan = setup
    middle = plan.layers[1].path
    path = export_onnx(loaded, plan, tmp_path / "one.onnx", taps=f"{middle}:max", steer=False,
                       options=ExportOptions(exporter="torchscript", low_rank=False))
    contract = read_contract(path)
    assert [l.path for l in contract.layers] == [middle] and contract.layers[0].steer_input == ""
    assert [t.output for t in contract.taps] == [tap_output_name(middle, "max")]
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["input"] and not sess.get_overridable_initializers()
    x = held_out_batch(loaded, 2)
    rewritten = apply_plan(loaded.model, plan, layers=[middle], poolings=("max",), low_rank=False)
    with torch.no_grad():
        reference = loaded.model(x).numpy()
        rewritten(x)
    logits, tap = sess.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(logits, reference, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(tap, read_taps(rewritten)[tap_output_name(middle, "max")].numpy(), atol=ATOL, rtol=RTOL)


def test_explicit_mode_and_per_image_steers(setup, tmp_path):
    loaded, plan = setup
    path = export_onnx(loaded, plan, tmp_path / "explicit.onnx", taps="all:cls",
                       options=ExportOptions(mode="explicit", steer_layout="per_image"))
    sess = session(path)
    x = held_out_batch(loaded, 3)
    with torch.no_grad():
        reference = loaded.model(x).numpy()
    np.testing.assert_allclose(sess.run(["logits"], {"input": x.numpy()})[0], reference, atol=ATOL, rtol=RTOL)
    layer = plan.layers[0]
    steer = np.ones((3, layer.n_subunits), np.float32)
    steer[1, :] = 0.0  # ablate every sub-unit of layer 0 for image 1 only
    steered = sess.run(["logits"], {"input": x.numpy(), steer_input_name(layer.path): steer})[0]
    np.testing.assert_allclose(steered[[0, 2]], reference[[0, 2]], atol=ATOL, rtol=RTOL)
    rewritten = apply_plan(loaded.model, plan, mode="explicit", poolings=())
    set_steers(rewritten, {name: 0.0 for name in layer.subunit_names()})
    with torch.no_grad():
        ablated = rewritten(x[1:2]).numpy()
    np.testing.assert_allclose(steered[1:2], ablated, atol=ATOL, rtol=RTOL)


def test_timm_model_exports(tmp_path):
    """A stock timm ViT (not the embedded one): generality of the export path."""
    torch.manual_seed(0)
    loaded = load_model("vit_tiny_patch16_224", model_kwargs={"img_size": 64})
    images = np.random.default_rng(0).integers(0, 256, (32, 64, 64, 3), dtype=np.uint8)
    plan = fit(loaded, ArraySource("random", 32, images=images),
               FitConfig(top_m=16, k_rule="fixed", k_max=2, stats_images=32, layers=["blocks.1.mlp", "blocks.2.mlp"])).plan
    path = export_onnx(loaded, plan, tmp_path / "tiny.onnx", taps="blocks.*.mlp:max,cls")
    x = torch.randn(2, 3, 64, 64)
    rewritten = apply_plan(loaded.model, plan, poolings=("max", "cls"))
    with torch.no_grad():
        reference = loaded.model(x).numpy()
        rewritten(x)
    sess = session(path)
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x.numpy()})))
    np.testing.assert_allclose(values["logits"], reference, atol=ATOL, rtol=RTOL)
    for name, value in read_taps(rewritten).items():
        np.testing.assert_allclose(values[name], value.numpy(), atol=ATOL, rtol=RTOL, err_msg=name)


def test_external_data(setup, tmp_path):
    """The > 2 GB path, forced on a small model: weights beside the graph, same results."""
    loaded, plan = setup
    path = export_onnx(loaded, plan, tmp_path / "big.onnx", taps=f"{plan.layers[0].path}:max",
                       options=ExportOptions(exporter="torchscript"), external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert path.stat().st_size < (tmp_path / "big.onnx.data").stat().st_size
    onnx.checker.check_model(str(path), full_check=True)
    x = held_out_batch(loaded, 2)
    with torch.no_grad():
        reference = loaded.model(x).numpy()
    np.testing.assert_allclose(session(path).run(["logits"], {"input": x.numpy()})[0], reference, atol=ATOL, rtol=RTOL)


def test_failed_export_leaves_no_file(setup, tmp_path, monkeypatch):
    import elude_export.export.onnx_export as onnx_export

    loaded, plan = setup

    def broken(*_args, **_kwargs):
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(onnx_export, "_run_dynamo", broken)
    monkeypatch.setattr(onnx_export, "_run_torchscript", broken)
    target = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="simulated exporter crash"):
        export_onnx(loaded, plan, target, taps="all")
    assert list(tmp_path.iterdir()) == []  # neither the model nor a temp file


def test_dynamo_failure_falls_back_to_torchscript(setup, tmp_path, monkeypatch):
    import elude_export.export.onnx_export as onnx_export

    loaded, plan = setup
    notes: list[str] = []

    def broken(*_args, **_kwargs):
        raise RuntimeError("torch.export cannot trace this")

    monkeypatch.setattr(onnx_export, "_run_dynamo", broken)
    path = export_onnx(loaded, plan, tmp_path / "m.onnx", taps=f"{plan.layers[0].path}:max", log=notes.append)
    assert read_contract(path).versions["exporter"] == "torchscript"
    assert any("falling back to the TorchScript exporter" in note for note in notes)


def test_tap_specs(setup):
    _, plan = setup
    paths = [l.path for l in plan.layers]
    assert parse_taps("all", plan) == {p: ("max",) for p in paths}
    assert parse_taps(f"{paths[1]}:max,mean;{paths[0]}:cls", plan) == {paths[0]: ("cls",), paths[1]: ("max", "mean")}
    assert parse_taps(["blocks.*.mlp:tokens"], plan) == {p: ("tokens",) for p in paths}
    assert parse_taps("none", plan) == {}
    with pytest.raises(ExportError, match="unknown tap layer"):
        parse_taps("blocks.99.mlp", plan)
    with pytest.raises(ExportError, match="unknown tap pooling"):
        parse_taps(f"{paths[0]}:median", plan)


def test_pooled_taps_match_their_definition():
    """u_jk = [route_j == k] * h_j per token, pooled over tokens; for both routers."""
    for router in ("context", "token"):
        loaded, plan = embedded_model_and_plan(router=router, rank=None)
        model = apply_plan(loaded.model, plan, poolings=("max", "mean", "cls"))
        layer = disentangled_layers(model)[plan.layers[1].path]
        seen = {}
        hook = layer.consumer.register_forward_pre_hook(lambda _m, args: seen.update(h=args[0], route=layer.consumer.route))
        x = held_out_batch(loaded, 4)
        with torch.no_grad():
            out = model(x)
        hook.remove()
        assert torch.equal(out, loaded.model(x))  # fused, steers at 1: bitwise the original
        h, route = seen["h"], seen["route"]
        route = route if route.ndim == 3 else route[:, None].expand(-1, h.shape[1], -1)
        parent, sub = plan.layers[1].columns()
        u = h[..., parent] * (route[..., parent] == sub).to(h.dtype)  # (B, N, S), the naive definition
        torch.testing.assert_close(layer.taps["max"], u.amax(1), rtol=0, atol=0)
        torch.testing.assert_close(layer.taps["mean"], u.mean(1), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer.taps["cls"], u[:, 0], rtol=0, atol=0)


# -- the CLI's user errors: one `error:` line, exit 2, no traceback ------------------------------


@pytest.fixture(scope="module")
def cli_files(setup, tmp_path_factory):
    from safetensors.torch import save_file

    loaded, plan = setup
    folder = tmp_path_factory.mktemp("cli")
    weights = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(weights))
    return plan.save(folder / "plan.safetensors"), weights


def run_cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def assert_user_error(code: int, output: str, *fragments: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in output, output


def test_cli_export_writes_model(cli_files, tmp_path):
    plan_path, weights = cli_files
    out = tmp_path / "cli.onnx"
    code, output = run_cli("export", "embedded", "--checkpoint", str(weights), "--plan", str(plan_path),
                           "-o", str(out), "--taps", "blocks.0.mlp:max,mean", "--exporter", "torchscript")
    assert code == 0, output
    assert "tap.blocks.0.mlp.mean" in output
    assert [t.output for t in read_contract(out).taps] == ["tap.blocks.0.mlp.max", "tap.blocks.0.mlp.mean"]


def test_cli_missing_plan(cli_files, tmp_path):
    _, weights = cli_files
    code, output = run_cli("export", "embedded", "--checkpoint", str(weights), "--plan", str(tmp_path / "none.safetensors"),
                           "-o", str(tmp_path / "m.onnx"))
    assert_user_error(code, output, "error:", "plan not found")


def test_cli_plan_for_another_model(cli_files, tmp_path):
    plan_path, weights = cli_files
    code, output = run_cli("export", "vit_tiny_patch16_224", "--img-size", "32", "--plan", str(plan_path),
                           "-o", str(tmp_path / "m.onnx"))
    assert_user_error(code, output, "error:", "fitted on model 'embedded'")
    from safetensors.torch import load_file, save_file

    other = {k: v + 1.0 if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    code, output = run_cli("export", "embedded", "--checkpoint", str(tmp_path / "other.safetensors"),
                           "--plan", str(plan_path), "-o", str(tmp_path / "m.onnx"))
    assert_user_error(code, output, "error:", "fitted on other weights")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_unwritable_output(cli_files, tmp_path):
    plan_path, weights = cli_files
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for target in (tmp_path / "missing" / "m.onnx", blocker / "m.onnx", tmp_path):
        code, output = run_cli("export", "embedded", "--checkpoint", str(weights), "--plan", str(plan_path),
                               "-o", str(target), "--taps", "blocks.0.mlp")
        assert_user_error(code, output, "error:")


def test_cli_unknown_tap_layer(cli_files, tmp_path):
    plan_path, weights = cli_files
    code, output = run_cli("export", "embedded", "--checkpoint", str(weights), "--plan", str(plan_path),
                           "-o", str(tmp_path / "m.onnx"), "--taps", "blocks.42.mlp:max")
    assert_user_error(code, output, "error: unknown tap layer 'blocks.42.mlp'")
    assert not (tmp_path / "m.onnx").exists()
