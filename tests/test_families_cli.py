"""`elude fit` + `export` + `validate` from the command line on a ResNet, a ConvNeXt and a
Hugging Face ViT (random weights saved as a checkpoint / a save_pretrained folder, 48 images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from elude_export.cli import main


def _images(path: Path) -> Path:
    from elude_export.data.sources import open_source

    np.save(path, np.concatenate([batch for _, batch in open_source("embedded:calib").batches(48, 48)]))
    return path


def _timm_checkpoint(path: Path, name: str, **kwargs) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return path


def _hf_vit(folder: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=4)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 32},
                                                                 "image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    return folder


# name: (model arguments given to every command, --layers, export mode)
FAMILIES = {
    "resnet18": (lambda tmp: ["resnet18", "--img-size", "32", "--checkpoint",
                              str(_timm_checkpoint(tmp / "resnet18.safetensors", "resnet18", zero_init_last=False))],
                 "layer1.0,layer4.1", "explicit"),
    "convnext_atto": (lambda tmp: ["convnext_atto", "--img-size", "32", "--checkpoint",
                                   str(_timm_checkpoint(tmp / "convnext.safetensors", "convnext_atto"))],
                      "stages.0.blocks.0.mlp,stages.3.blocks.1.mlp", "fused"),
    "hf_vit": (lambda tmp: [str(_hf_vit(tmp / "hf_vit"))], None, "fused"),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fit_export_validate(tmp_path: Path, family: str) -> None:
    model_args, layers, mode = FAMILIES[family]
    model = model_args(tmp_path)
    data = str(_images(tmp_path / "images.npy"))
    plan, onnx = str(tmp_path / "plan.safetensors"), str(tmp_path / "model.onnx")
    runner = CliRunner()
    fit = runner.invoke(main, ["fit", *model, "--data", data, "--top-m", "16", "--k-max", "3", "--quiet", "-o", plan,
                               *(["--layers", layers] if layers else [])])
    assert fit.exit_code == 0, fit.output
    assert "found 2 neuron layer(s)" in fit.output
    export = runner.invoke(main, ["export", *model, "--plan", plan, "-o", onnx, "--mode", mode])
    assert export.exit_code == 0, export.output
    validate = runner.invoke(main, ["validate", *model, "--plan", plan, "--onnx", onnx, "--data", data,
                                    "--limit", "16"])
    assert validate.exit_code == 0, validate.output
    assert "result: OK" in validate.output and "steering (" in validate.output
