"""Hugging Face transformers MLPs, recognised by structure inside `transformers.*` classes.

No import of transformers here (it is an optional extra): an adapter matches a module whose
class comes from `transformers` and whose children have the family's names.
- `ViTMLP` / `Dinov2MLP` / `CLIPMLP` / `SiglipMLP` (transformers 5, and CLIP / Siglip before):
  fc1 -> activation_fn -> fc2;
- gated `Dinov2SwiGLUFFN` (transformers 5): down_proj(act(gate_proj x) * up_proj x), signed units;
- transformers 4 `ViTLayer`-style layers: `intermediate.dense` (+ act) then `output.dense` (+ the
  residual, added after the consumer): the neuron layer is the pair inside the layer, so its
  routing input is `intermediate.dense`'s input, not the layer's;
- `ConvNextLayer` / `ConvNextV2Layer`: pwconv1 -> act [-> grn] -> pwconv2 on a channels-last map.
"""

from __future__ import annotations

from torch import nn

from elude_export.layers.base import LayerAdapter, NeuronLayer, is_linear, register_adapter


def _from_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _linear(module: nn.Module, path: str) -> nn.Linear | None:
    try:
        child = module.get_submodule(path)
    except AttributeError:
        return None
    return child if is_linear(child) else None


def _pair(module: nn.Module, first: str, second: str) -> bool:
    a, b = _linear(module, first), _linear(module, second)
    return a is not None and b is not None and a.out_features == b.in_features


@register_adapter
class HfMlpAdapter(LayerAdapter):
    """fc1 -> activation -> fc2 MLPs of transformers vision models (ViT, DINOv2, CLIP, Siglip)."""

    kind = "hf_mlp"

    def matches(self, module: nn.Module) -> bool:
        return (_from_transformers(module) and _pair(module, "fc1", "fc2")
                and sum(is_linear(c) for c in module.children()) == 2)

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        return NeuronLayer(path, module, self.kind, "fc2", lambda m: m.fc1.weight)


@register_adapter
class HfGatedMlpAdapter(LayerAdapter):
    """down_proj(act(gate_proj x) * up_proj x) (DINOv2 SwiGLU FFN): units are signed."""

    kind = "hf_gated_mlp"

    def matches(self, module: nn.Module) -> bool:
        return (_from_transformers(module) and _pair(module, "gate_proj", "down_proj")
                and _linear(module, "up_proj") is not None)

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        return NeuronLayer(path, module, self.kind, "down_proj", lambda m: m.gate_proj.weight, signed=True)


@register_adapter
class HfIntermediateOutputAdapter(LayerAdapter):
    """transformers 4 ViT / DeiT / DINOv2-style layers: intermediate.dense (+act) -> output.dense."""

    kind = "hf_layer"

    def matches(self, module: nn.Module) -> bool:
        return _from_transformers(module) and _pair(module, "intermediate.dense", "output.dense")

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        return NeuronLayer(path, module, self.kind, "output.dense", lambda m: m.intermediate.dense.weight,
                           input_name="intermediate.dense")


@register_adapter
class HfConvNextLayerAdapter(LayerAdapter):
    """transformers `ConvNextLayer` / `ConvNextV2Layer`: pwconv1 -> act -> pwconv2, channels-last."""

    kind = "hf_convnext"

    def matches(self, module: nn.Module) -> bool:
        return _from_transformers(module) and _pair(module, "pwconv1", "pwconv2")

    def describe(self, path: str, module: nn.Module) -> NeuronLayer:
        return NeuronLayer(path, module, self.kind, "pwconv2", lambda m: m.pwconv1.weight, input_name="pwconv1")
