"""The routing context rule: which vector describes an image at a layer, decided per layer.

The context router routes every token of an image by one vector: the class token's input to
the layer when that layer's sequence starts with one, else the mean token (for CNNs: the
spatially pooled input). Fitting (the descriptors it clusters) and the rewrite (the router it
runs) must use the same rule, so it lives here. It is a property of the layer, not of the model:
CaiT / XCiT patch blocks carry no class token (their class-attention blocks do), Hugging Face
models keep theirs under `embeddings`, and a layer whose context is constant across images
(MLP-Mixer's token-mixing MLPs read the mean over channels of a LayerNorm output, ~0 for every
image) has no context at all: refused, with the reason, instead of routing by float noise.
"""

from __future__ import annotations

import torch
from torch import nn

from elude_export.layers.layout import CHANNELS_LAST, to_tokens

# timm models whose class token joins only some block groups: {class name: groups without it}
PATCH_ONLY_GROUPS = {"Cait": ("blocks",), "Xcit": ("blocks",)}
NO_CONTEXT_REASON = ("token-mixing MLP: its features are patch positions and its tokens the channels of a "
                     "LayerNorm output, whose mean is ~0 for every image, so no context carries information")


def context_of(model: nn.Module, layer_path: str) -> tuple[str | None, str]:
    """(context token, why) for the layer at `layer_path`; token None: the layer has no usable context."""
    parent_path, _, name = layer_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if type(parent).__name__ == "MixerBlock" and name == "mlp_tokens":
        return None, NO_CONTEXT_REASON
    if getattr(model, "cls_token", None) is not None:
        group = layer_path.split(".")[0]
        if group in PATCH_ONLY_GROUPS.get(type(model).__name__, ()):
            return "mean", f"{type(model).__name__} patch blocks carry no class token"
        return "cls", "the sequence starts with the model's class token"
    if _hf_class_token(model, layer_path):
        return "cls", "Hugging Face encoder layer: the embeddings prepend the class token"
    return "mean", "no class token in this layer's sequence: mean token (spatial mean for feature maps)"


def context_token_of(model: nn.Module, layer_path: str | None = None) -> str:
    """'cls' or 'mean' for a layer (the model-level rule when no path is given)."""
    if layer_path is None:
        return "cls" if getattr(model, "cls_token", None) is not None else "mean"
    token, _why = context_of(model, layer_path)
    return token or "mean"


def _hf_class_token(model: nn.Module, layer_path: str) -> bool:
    """A layer of the encoder (`encoder` / `layers` / `layer`) next to embeddings that prepend a class token."""
    for path, module in model.named_modules():
        parent, _, name = path.rpartition(".")
        if name != "embeddings" or (getattr(module, "cls_token", None) is None
                                    and getattr(module, "class_embedding", None) is None):
            continue
        inner = layer_path[len(parent) + 1:] if parent else layer_path
        if (not parent or layer_path.startswith(parent + ".")) and inner.split(".")[0] in ("encoder", "layers", "layer"):
            return True
    return False


def context_vector(x: torch.Tensor, context_token: str, channel_axis: int = CHANNELS_LAST) -> torch.Tensor:
    """Layer input (tokens, or a feature map) -> (B, d) context of each image."""
    tokens = to_tokens(x, channel_axis)
    return tokens[:, 0] if context_token == "cls" else tokens.mean(1)


UNINFORMATIVE_RATIO = 1e-3  # context norm / token norm below this: a cancelling mean, not an image description


def uninformative_context(x: torch.Tensor, context_token: str, channel_axis: int = CHANNELS_LAST) -> bool:
    """Whether the contexts of a batch are ~0 next to the tokens they summarise (a data check, for
    calibration's first batch: what the family rules above catch by class, e.g. a mean that cancels)."""
    tokens = to_tokens(x, channel_axis).float()
    context = context_vector(tokens, context_token)
    token_norm = tokens.norm(dim=-1).mean()
    return bool(token_norm > 0 and context.norm(dim=-1).mean() < UNINFORMATIVE_RATIO * token_norm)
