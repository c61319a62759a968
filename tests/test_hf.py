"""Hugging Face transformers vision models, loaded as users have them (a save_pretrained folder).

Tiny configs with random weights (width 32, 2 layers, 32x32 images), saved to a temporary
folder with an image processor config and loaded through `load_model(folder)`: the MLPs are
found without --layers, each layer routes by the context it really sees, the wrapper names the
model's real output, fused mode is bitwise and explicit mode within 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from elude_export.compare import compare
from elude_export.errors import ModelLoadError
from elude_export.layers import find_layers
from elude_export.models import load_model
from elude_export.rewrite import apply_plan
from plan_factory import random_plan

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)
PROCESSOR = {"size": {"height": 32, "width": 32}, "image_mean": [0.4, 0.45, 0.5], "image_std": [0.2, 0.25, 0.3]}

# name: (config, model class, output, adapter kind, context token)
CASES = {
    "vit": (lambda: transformers.ViTConfig(**SMALL, num_labels=5), "ViTForImageClassification", "logits",
            "hf_mlp", "cls"),
    "dinov2": (lambda: transformers.Dinov2Config(**{k: v for k, v in SMALL.items() if k != "intermediate_size"},
                                                 mlp_ratio=2), "Dinov2Model", "pooler_output", "hf_mlp", "cls"),
    "dinov2_swiglu": (lambda: transformers.Dinov2Config(**{k: v for k, v in SMALL.items() if k != "intermediate_size"},
                                                        mlp_ratio=2, use_swiglu_ffn=True), "Dinov2Model",
                      "pooler_output", "hf_gated_mlp", "cls"),
    "clip": (lambda: transformers.CLIPVisionConfig(**SMALL), "CLIPVisionModel", "pooler_output", "hf_mlp", "cls"),
    "siglip": (lambda: transformers.SiglipVisionConfig(**SMALL), "SiglipVisionModel", "pooler_output", "hf_mlp",
               "mean"),
    "convnext": (lambda: transformers.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3,
                                                     image_size=32), "ConvNextForImageClassification", "logits",
                 "hf_convnext", "mean"),
}


def save_tiny(folder: Path, case: str) -> Path:
    """A random-weight model of `case` saved with save_pretrained plus its image processor settings."""
    make_config, class_name = CASES[case][:2]
    torch.manual_seed(0)
    getattr(transformers, class_name)(make_config()).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_hf_model_from_folder_is_rewritten_losslessly(tmp_path: Path, case: str) -> None:
    _, _, output, kind, token = CASES[case]
    loaded = load_model(str(save_tiny(tmp_path / case, case)))
    assert loaded.output_name == output
    assert (loaded.input_spec.height, loaded.input_spec.mean, loaded.input_spec.std) == (
        32, tuple(PROCESSOR["image_mean"]), tuple(PROCESSOR["image_std"]))
    layers = [layer for layer in find_layers(loaded.model) if ".head." not in layer.path]  # Siglip's pooling head
    assert len(layers) == 2 and {layer.kind for layer in layers} == {kind}
    assert {layer.context_token for layer in layers} == {token}
    plan = random_plan(loaded.model, loaded.input_spec)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = loaded.model(x)
        assert torch.equal(apply_plan(loaded.model, plan, mode="fused")(x), reference)
        result = compare("explicit", reference, apply_plan(loaded.model, plan, mode="explicit")(x), 1e-5, 1e-5)
    assert result.ok, result.line()


def test_hf_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="network.*HF_HUB_OFFLINE"):
        load_model("hf:google/vit-base-patch16-224")
    folder = save_tiny(tmp_path / "vit", "vit")
    with pytest.raises(ModelLoadError, match="cannot be set for Hugging Face"):
        load_model(str(folder), model_kwargs={"img_size": 64})
