"""Neuron layers: which modules ELUDe rewrites, recognised by registered adapters."""

from elude_export.layers.base import ADAPTERS, LayerAdapter, NeuronLayer, register_adapter
from elude_export.layers.context import context_of, context_token_of, context_vector, uninformative_context
from elude_export.layers.find import SkippedModule, describe_layer, find_layers, survey_layers
from elude_export.layers.layout import CHANNELS_FIRST, CHANNELS_LAST, from_tokens, to_tokens

__all__ = ["ADAPTERS", "CHANNELS_FIRST", "CHANNELS_LAST", "LayerAdapter", "NeuronLayer", "SkippedModule",
           "context_of", "context_token_of", "context_vector", "describe_layer", "find_layers", "from_tokens",
           "register_adapter", "survey_layers", "to_tokens", "uninformative_context"]
