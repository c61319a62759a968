"""Neuron layers: which modules ELUDe rewrites, recognised by registered adapters."""

from elude_export.layers.base import ADAPTERS, LayerAdapter, NeuronLayer, register_adapter
from elude_export.layers.context import context_token_of, context_vector
from elude_export.layers.find import describe_layer, find_layers

__all__ = ["ADAPTERS", "LayerAdapter", "NeuronLayer", "context_token_of", "context_vector", "describe_layer",
           "find_layers", "register_adapter"]
