"""Hugging Face transformers vision models, as users have them: a `save_pretrained` folder or `hf:ORG/NAME`.

`transformers` is an optional extra (`pip install 'elude-export[hf]'`). The model is wrapped so
that, like a timm model, it takes a pixel tensor and returns one tensor, and the export names
that tensor after the model's real output:
- `logits` for `*ForImageClassification` models;
- `pooler_output` for encoders that have one (ViTModel with its pooler, Dinov2Model, CLIPVisionModel,
  SiglipVisionModel with its head, ConvNextModel): the image embedding users consume;
- `last_hidden_state` otherwise (ViTModel without pooler).
The input spec (size, mean, std) is the saved image processor's (`preprocessor_config.json`),
so calibration and the ONNX contract prepare images the way the model was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from elude_export.errors import ModelLoadError
from elude_export.models.spec import InputSpec

HF_PREFIX = "hf:"
PROCESSOR_FILE = "preprocessor_config.json"
OUTPUT_PREFERENCE = ("logits", "pooler_output", "last_hidden_state")


class HfImageModel(nn.Module):
    """pixel_values -> one output tensor of a transformers model (which one: `output`)."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values=pixel_values, return_dict=True), self.output)


def is_hf_reference(name: str) -> bool:
    """`hf:ORG/NAME`, or a local folder holding a transformers `config.json`."""
    return name.startswith(HF_PREFIX) or (Path(name).is_dir() and (Path(name) / "config.json").is_file())


def load_hf(name: str) -> tuple[HfImageModel, InputSpec, int]:
    """(wrapped model in eval mode, its input spec, number of classes or 0)."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(f"'{name}' is a Hugging Face model: install the extra with "
                             "`pip install 'elude-export[hf]'` (transformers)") from exc
    remote = name.startswith(HF_PREFIX)
    source = name[len(HF_PREFIX):] if remote else name
    config = _read(lambda: transformers.AutoConfig.from_pretrained(source), name, remote)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        raise ModelLoadError(f"Hugging Face model '{name}': its config names no known architecture "
                             f"({architecture!r}); save it with save_pretrained from a transformers model class")
    model = _read(lambda: model_class.from_pretrained(source, attn_implementation="eager"), name, remote).eval()
    spec = input_spec_of(_processor_config(source, remote), config)
    output = _output_of(model, spec)
    classes = int(config.num_labels) if output == "logits" else 0
    return HfImageModel(model, output).eval(), spec, classes


def _read(load, name: str, remote: bool) -> Any:
    """Run a transformers loader; a missing file, no network or offline mode becomes one clear error."""
    try:
        return load()
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        hint = (" (downloading needs network access to the Hugging Face Hub; offline, or with HF_HUB_OFFLINE=1, "
                "pass a local save_pretrained folder instead)") if remote else ""
        raise ModelLoadError(f"cannot load Hugging Face model '{name}': {first}{hint}") from exc


def _processor_config(source: str, remote: bool) -> dict:
    """The saved image processor settings, {} when the model has none."""
    if not remote:
        path = Path(source) / PROCESSOR_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, PROCESSOR_FILE)).read_text())
    except Exception:  # a hub model without a processor file: the config's image size, mean/std 0.5
        return {}


def _size(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), int(value["shortest_edge"])
    return None


def input_spec_of(processor: dict, config: Any) -> InputSpec:
    """Size (crop size when the processor center-crops), mean and std from the image processor."""
    vision = getattr(config, "vision_config", None) or config
    channels = int(getattr(vision, "num_channels", 3))
    size = (_size(processor.get("crop_size")) if processor.get("do_center_crop") else None) or _size(
        processor.get("size"))
    if size is None:
        image_size = getattr(vision, "image_size", 224)
        size = _size(image_size) or tuple(int(v) for v in image_size)
    mean = tuple(float(v) for v in processor.get("image_mean", (0.5,) * channels))
    std = tuple(float(v) for v in processor.get("image_std", (0.5,) * channels))
    return InputSpec(channels, size[0], size[1], mean, std)


@torch.no_grad()
def _output_of(model: nn.Module, spec: InputSpec) -> str:
    """The first of logits / pooler_output / last_hidden_state the model really returns."""
    probe = torch.zeros(1, spec.channels, spec.height, spec.width, dtype=next(model.parameters()).dtype)
    try:
        outputs = model(pixel_values=probe, return_dict=True)
    except Exception as exc:  # a model that cannot run on its own processor's size is the user's to fix
        raise ModelLoadError(f"Hugging Face model does not run on a {spec.height}x{spec.width} image: "
                             f"{exc.__class__.__name__}: {exc}") from exc
    for name in OUTPUT_PREFERENCE:
        if isinstance(getattr(outputs, name, None), torch.Tensor):
            return name
    raise ModelLoadError(f"Hugging Face model {model.__class__.__name__} returns none of {', '.join(OUTPUT_PREFERENCE)}")
