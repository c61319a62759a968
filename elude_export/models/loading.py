"""Load the model to disentangle: a timm name, a local checkpoint, or the embedded default.

No weights can be downloaded on an air-gapped machine, so the package ships a small ViT
trained on its own concept dataset (`EMBEDDED_MODEL`); everything else goes through timm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from elude_export.errors import ModelLoadError
from elude_export.models.hf import is_hf_reference, load_hf
from elude_export.models.spec import InputSpec

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
EMBEDDED_MODEL = "embedded"
EMBEDDED_WEIGHTS = DATA_DIR / "embedded_vit.safetensors"
# a second bundled model, trained on scikit-learn's digits (upsampled to 32x32 RGB), 10 classes
EMBEDDED_DIGITS_MODEL = "embedded-digits"
EMBEDDED_DIGITS_WEIGHTS = DATA_DIR / "digits_vit.safetensors"

# The embedded default: a 4-block, width-96 timm ViT for 32x32 RGB concept scenes.
EMBEDDED_ARCH: dict[str, Any] = dict(
    img_size=32,
    patch_size=4,
    in_chans=3,
    num_classes=4,
    embed_dim=96,
    depth=4,
    num_heads=3,
    mlp_ratio=4.0,
)
EMBEDDED_MEAN = (0.5, 0.5, 0.5)
EMBEDDED_STD = (0.25, 0.25, 0.25)


@dataclass
class LoadedModel:
    """A model in eval mode plus what downstream stages need to know about it."""

    model: nn.Module
    name: str
    input_spec: InputSpec
    num_classes: int
    output_name: str = ""  # the model's own name for its output (Hugging Face: logits / pooler_output)


def create_embedded_model(pretrained: bool = True, digits: bool = False) -> nn.Module:
    """Build a bundled ViT (concepts, or `digits`); with `pretrained`, load its committed weights."""
    import timm.models.vision_transformer as vit

    arch = {**EMBEDDED_ARCH, "num_classes": 10} if digits else EMBEDDED_ARCH
    weights = EMBEDDED_DIGITS_WEIGHTS if digits else EMBEDDED_WEIGHTS
    model = vit.VisionTransformer(**arch)
    if pretrained:
        if not weights.is_file():
            script = "train_digits.py" if digits else "train_embedded.py"
            raise ModelLoadError(f"bundled weights missing at {weights}; run `python examples/{script}` to create them")
        load_checkpoint_into(model, weights)
    return model.eval()


def embedded_input_spec() -> InputSpec:
    return InputSpec(3, EMBEDDED_ARCH["img_size"], EMBEDDED_ARCH["img_size"], EMBEDDED_MEAN, EMBEDDED_STD)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict safely: safetensors, or a pickle restricted to tensors."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse failure of an untrusted file is the user's corrupt file
        raise ModelLoadError(f"cannot read checkpoint {path}: {exc.__class__.__name__}: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def load_checkpoint_into(model: nn.Module, path: str | Path) -> None:
    """Load weights strictly: a checkpoint of another architecture is refused, not half-loaded."""
    state = read_checkpoint(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first_lines = "; ".join(str(exc).splitlines()[:3])
        raise ModelLoadError(f"checkpoint {path} does not fit the model: {first_lines}") from exc


def _timm_input_spec(model: nn.Module) -> InputSpec:
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    channels, height, width = config["input_size"]
    return InputSpec(int(channels), int(height), int(width), tuple(config["mean"]), tuple(config["std"]))


def load_model(
    name: str = EMBEDDED_MODEL,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> LoadedModel:
    """Resolve a model by name: `embedded`, a Hugging Face folder or `hf:ORG/NAME` (`models/hf.py`), or any
    timm model name (random weights unless told)."""
    if name in (EMBEDDED_MODEL, EMBEDDED_DIGITS_MODEL):
        digits = name == EMBEDDED_DIGITS_MODEL
        model = create_embedded_model(pretrained=checkpoint is None, digits=digits)
        if checkpoint is not None:
            load_checkpoint_into(model, checkpoint)
        return LoadedModel(model.eval(), name, embedded_input_spec(), 10 if digits else EMBEDDED_ARCH["num_classes"])

    if is_hf_reference(name):
        return _load_hf_model(name, checkpoint, model_kwargs)

    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5] if name else []
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ModelLoadError(
            f"unknown model '{name}': not a timm model name nor '{EMBEDDED_MODEL}' / '{EMBEDDED_DIGITS_MODEL}'{hint}"
        )
    model = _create_timm(name, pretrained and checkpoint is None, dict(model_kwargs or {}))
    if checkpoint is not None:
        load_checkpoint_into(model, checkpoint)
    spec = _timm_input_spec(model)
    if model_kwargs and "img_size" in model_kwargs:
        size = int(model_kwargs["img_size"])
        spec = InputSpec(spec.channels, size, size, spec.mean, spec.std)
    return LoadedModel(model.eval(), name, spec, int(getattr(model, "num_classes", 0) or 0))


def _load_hf_model(name: str, checkpoint: str | Path | None, model_kwargs: dict[str, Any] | None) -> LoadedModel:
    if model_kwargs:
        raise ModelLoadError(f"{', '.join(model_kwargs)} cannot be set for Hugging Face model '{name}': "
                             "its saved config and image processor fix the architecture and input size")
    model, spec, classes = load_hf(name)
    if checkpoint is not None:
        load_checkpoint_into(model, checkpoint)
    return LoadedModel(model, name, spec, classes, model.output)


def _create_timm(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model; CNNs take no `img_size` (they run at any size), so it only sets their input spec."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        if "img_size" in kwargs and "img_size" in str(exc):
            return _create_timm(name, pretrained, {k: v for k, v in kwargs.items() if k != "img_size"})
        raise ModelLoadError(f"cannot create timm model '{name}': {exc.__class__.__name__}: {exc}") from exc
    except Exception as exc:  # hub/network failures and bad kwargs surface as one clear message
        raise ModelLoadError(f"cannot create timm model '{name}': {exc.__class__.__name__}: {exc}") from exc
