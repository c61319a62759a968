"""The rewrite is lossless: fused mode bitwise, explicit mode within 1e-5, on several architectures."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import GluMlp, SwiGLU

from elude_export.errors import PlanError
from elude_export.models import InputSpec, create_embedded_model, embedded_input_spec
from elude_export.rewrite import apply_plan, disentangled_layers, read_taps, reset_steers, set_steers
from plan_factory import random_plan


def _timm(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


ARCHITECTURES = {
    "embedded": lambda: (torch.manual_seed(0), create_embedded_model(pretrained=False))[1],
    "vit_tiny": lambda: _timm("vit_tiny_patch16_224", img_size=32),
    "deit_tiny": lambda: _timm("deit_tiny_patch16_224", img_size=32),
    "dinov2_small": lambda: _timm("vit_small_patch14_dinov2", img_size=28),  # LayerScale, no pos-embed interp
    "eva02_tiny_glu": lambda: _timm("eva02_tiny_patch14_224", img_size=28),  # packed SwiGLU (GluMlp)
    "vit_swiglu_norm": lambda: _timm("vit_small_patch16_224", img_size=32, depth=2, mlp_layer=SwiGLU,
                                     act_layer=torch.nn.SiLU, scale_mlp_norm=True),
    "vit_glu": lambda: _timm("vit_small_patch16_224", img_size=32, depth=2, mlp_layer=GluMlp, act_layer=torch.nn.SiLU),
}


def _inputs(model: torch.nn.Module, batch: int, seed: int = 1) -> torch.Tensor:
    size = model.patch_embed.img_size if hasattr(model, "patch_embed") else (32, 32)
    generator = torch.Generator().manual_seed(seed)
    # realistic inputs: smooth images in the normalised range, not zeros
    coarse = torch.rand(batch, 3, 4, 4, generator=generator) * 4 - 2
    return torch.nn.functional.interpolate(coarse, size=tuple(size), mode="bilinear") + 0.1 * torch.randn(
        batch, 3, *size, generator=generator)


def _spec(model: torch.nn.Module) -> InputSpec:
    height, width = model.patch_embed.img_size
    return InputSpec(3, height, width, (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("router", ["context", "token"])
@torch.no_grad()
def test_fused_bitwise_and_explicit_close(arch: str, router: str) -> None:
    model = ARCHITECTURES[arch]()
    plan = random_plan(model, _spec(model), router=router, seed=3)
    assert sum(layer.split_units.numel() for layer in plan.layers) > 0
    fused = apply_plan(model, plan, mode="fused")
    explicit = apply_plan(model, plan, mode="explicit")
    for batch in (1, 3):
        x = _inputs(model, batch)
        reference = model(x)
        assert torch.equal(fused(x), reference), f"{arch}/{router} fused output differs (batch {batch})"
        out = explicit(x)
        scale = reference.abs().max()
        assert (out - reference).abs().max() <= 1e-5 * max(1.0, float(scale)), f"{arch}/{router} explicit too far"
        assert not torch.equal(reference, torch.zeros_like(reference))


@torch.no_grad()
def test_original_model_untouched_and_taps_named() -> None:
    model = ARCHITECTURES["embedded"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = random_plan(model, embedded_input_spec())
    rewritten = apply_plan(model, plan)
    rewritten(_inputs(model, 2))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    taps = read_taps(rewritten)
    for layer in plan.layers:
        for pooling in ("max", "mean", "cls"):
            assert taps[f"tap.{layer.path}.{pooling}"].shape == (2, layer.n_subunits)


@pytest.mark.parametrize("router", ["context", "token"])
@torch.no_grad()
def test_subunits_sum_to_their_unit(router: str) -> None:
    """Partition of unity: token-level sub-unit activations of each unit add up to the unit."""
    for seed in range(4):
        model = ARCHITECTURES["embedded"]()
        plan = random_plan(model, embedded_input_spec(), router=router, k_max=2 + seed, seed=seed)
        rewritten = apply_plan(model, plan, token_taps=True)
        hidden: dict[str, torch.Tensor] = {}
        for path, layer in disentangled_layers(rewritten).items():
            layer.consumer.register_forward_pre_hook(lambda _m, args, path=path: hidden.__setitem__(path, args[0]))
        rewritten(_inputs(model, 2, seed))
        taps = read_taps(rewritten)
        for layer in plan.layers:
            tokens = taps[f"tap.{layer.path}.tokens"]
            parent, _ = layer.columns()
            summed = torch.zeros_like(hidden[layer.path]).index_add_(-1, parent, tokens)
            assert torch.equal(summed, hidden[layer.path])
            # exactly one sub-unit carries each unit's value per token
            carriers = torch.zeros_like(hidden[layer.path]).index_add_(-1, parent, (tokens != 0).float())
            assert carriers.max() <= 1


@torch.no_grad()
def test_bfloat16_rewrite_within_tolerance() -> None:
    model = ARCHITECTURES["embedded"]()
    plan = random_plan(model, embedded_input_spec())
    x = _inputs(model, 2)
    reference = copy.deepcopy(model).to(torch.bfloat16)(x.bfloat16()).float()
    for mode in ("fused", "explicit"):
        rewritten = apply_plan(model, plan, mode=mode).to(torch.bfloat16)
        out = rewritten(x.bfloat16()).float()
        if mode == "fused":
            assert torch.equal(out, reference)
        else:
            assert (out - reference).abs().max() <= 0.05 * reference.abs().max()


@torch.no_grad()
def test_steering_scales_only_the_named_subunit() -> None:
    model = ARCHITECTURES["embedded"]()
    plan = random_plan(model, embedded_input_spec(), router="token", seed=5)
    rewritten = apply_plan(model, plan)
    x = _inputs(model, 4)
    reference = model(x)
    layer = plan.layers[0]  # early enough that every token, hence the CLS logits, feels it
    name = next(n for n in layer.subunit_names() if n.endswith(".1"))
    set_steers(rewritten, {name: 0.0})
    steered = rewritten(x)
    assert not torch.equal(steered, reference)
    explicit = apply_plan(model, plan, mode="explicit")
    set_steers(explicit, {name: 0.0})
    assert torch.allclose(explicit(x), steered, atol=1e-5)
    reset_steers(rewritten)
    assert torch.equal(rewritten(x), reference)


def test_refuses_plan_for_other_weights_and_bad_names() -> None:
    model = ARCHITECTURES["embedded"]()
    plan = random_plan(model, embedded_input_spec())
    other = create_embedded_model(pretrained=False)
    with pytest.raises(PlanError, match="other weights"):
        apply_plan(other, plan)
    wrong_arch = ARCHITECTURES["vit_tiny"]()
    with pytest.raises(PlanError):
        apply_plan(wrong_arch, plan, check_fingerprint=False)
    rewritten = apply_plan(model, plan)
    for bad in ("blocks.0.mlp/9999.0", "blocks.0.mlp/0000.7", "nope/0001.0", "garbage"):
        with pytest.raises(PlanError):
            set_steers(rewritten, {bad: 0.0})
    with pytest.raises(PlanError, match="mode"):
        apply_plan(model, plan, mode="magic")


@torch.no_grad()
def test_generic_layers_on_flat_features_are_lossless() -> None:
    from test_layers import Net

    torch.manual_seed(0)
    net = Net().eval()
    plan = random_plan(net, InputSpec(3, 1, 1, (0.0,) * 3, (1.0,) * 3), layers=["seq", "custom"], seed=2)
    x = torch.randn(5, 8)
    assert torch.equal(apply_plan(net, plan)(x), net(x))
    assert torch.allclose(apply_plan(net, plan, mode="explicit")(x), net(x), atol=1e-6)
