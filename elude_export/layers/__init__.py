"""Neuron layers: which modules ELUDe rewrites, recognised by registered adapters."""
