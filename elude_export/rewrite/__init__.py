"""Rewrite stage: a Plan applied to an nn.Module, losslessly (router, consumer, taps, steers)."""
