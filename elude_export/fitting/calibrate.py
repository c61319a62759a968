"""Calibration: stream images through the model and keep, per unit, its top-M activations.

Memory stays bounded: per layer we hold a running top-M `(M, units)` of values and the
descriptor each kept activation will be clustered by, never all tokens of all images.
- `context` router: the descriptor of an activation is its image's context vector (the CLS
  token's input to the layer, or the mean token when the model has no CLS token), so we keep
  one `(d,)` vector per image plus `(M, units)` image indices. One image counts once per unit.
- `token` router: the descriptor is the token's own input; we keep `(M, units, d)` vectors, and
  at most `per_image_cap` tokens of one image per unit, so one image cannot dominate a unit.
  Layers are grouped into passes so that these buffers stay under `max_buffer_bytes`.

With `keep_image_maxima=n` the context router also keeps each unit's per-image maximum for the
first n images ((n, units) floats per layer): with the contexts, that is everything the
monitoring statistics need, so they cost no second pass.

Each forward pass stops (a private `_StopForward` raised from the hook) once every layer of the
pass has been seen, so layers after the last target cost nothing. The kept top-M is ordered by
(value descending, image id ascending): the top-M of a union is then one well-defined list,
whichever way the images were batched or sharded, which is what makes shards mergeable
exactly (`fitting/parts.py`). Image ids are global: a shard passes its first image's id.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from elude_export.errors import DataError
from elude_export.data.sources import ImageSource
from elude_export.layers import NeuronLayer, context_vector
from elude_export.models import InputSpec, model_batches
from elude_export.vocabulary import ROUTERS


@dataclass
class LayerActivations:
    """What calibration kept for one layer."""

    path: str
    top_values: torch.Tensor  # (M, H) descending per unit
    top_images: torch.Tensor  # (M, H) image index of each kept activation
    descriptors: torch.Tensor | None  # token router: (M, H, d)
    contexts: torch.Tensor | None  # context router: (n_images, d), row i is image first_image + i
    n_images: int
    first_image: int = 0
    # context router, in-process: (n, H) per-unit max over tokens of the first n images, i.e. the
    # image-pooled tap of a context-routed unit; the monitoring statistics are computed from it
    # and the contexts instead of a second forward pass (`fitting/statistics.py`)
    image_maxima: torch.Tensor | None = None

    def unit_descriptors(self, units: slice | torch.Tensor) -> torch.Tensor:
        """(units, M, d) descriptors for a block of units: what their profiles are built from."""
        if self.descriptors is not None:
            return self.descriptors[:, units].transpose(0, 1)
        assert self.contexts is not None
        return self.contexts[self.top_images[:, units].transpose(0, 1) - self.first_image]


class _StopForward(Exception):
    """Raised by the last hook of a pass: the rest of the model is not needed."""


def top_m_merge(
    values: torch.Tensor, images: torch.Tensor, descriptors: torch.Tensor | None, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keep the `keep` largest candidates per unit, ordered by (value desc, image id asc).

    values/images (C, H), descriptors (C, H, d). Ties break by image id, then candidate order,
    so the result does not depend on how images were grouped into batches or shards.
    """
    by_image = images.argsort(dim=0, stable=True)
    order = by_image.gather(0, values.gather(0, by_image).argsort(dim=0, descending=True, stable=True))[:keep]
    picked = descriptors.gather(0, order[..., None].expand(order.shape[0], *descriptors.shape[1:])) \
        if descriptors is not None else None
    return values.gather(0, order), images.gather(0, order), picked


class _TopMStream:
    """Running top-M per unit for one layer, fed from forward hooks."""

    def __init__(self, layer: NeuronLayer, router: str, top_m: int, per_image_cap: int, keep_maxima: int = 0):
        self.layer = layer
        self.keep_maxima = keep_maxima  # global image ids below this keep their per-unit maxima
        self.maxima: list[torch.Tensor] = []
        self.router = router
        self.context_token = layer.context_token
        self.top_m = top_m
        self.cap = per_image_cap
        self.values: torch.Tensor | None = None
        self.images: torch.Tensor | None = None
        self.descriptors: torch.Tensor | None = None
        self.contexts: list[torch.Tensor] = []
        self.pending_input: torch.Tensor | None = None
        self.batch_images: torch.Tensor | None = None
        self.on_done: Callable[[], None] = lambda: None  # called once this batch is recorded

    def on_input(self, _module: nn.Module, args: tuple) -> None:
        self.pending_input = args[0]

    def on_hidden(self, _module: nn.Module, args: tuple) -> None:
        x, h = self.pending_input, args[0]
        assert x is not None and self.batch_images is not None
        self.pending_input = None
        # (B, tokens, channels) whatever the layout: flat features, sequences, NCHW / NHWC maps
        x, h = self.layer.to_tokens(x), self.layer.to_tokens(h)
        if x.ndim != 3 or h.ndim != 3:
            raise DataError(f"layer {self.layer.path}: expected (batch, tokens, dim) activations, got {tuple(h.shape)}")
        x, h = x.detach().float(), h.detach().float()
        score = h.abs() if self.layer.signed else h
        if self.router == "context":
            context = context_vector(x, self.context_token)
            # a copy: the CLS context is a view of the whole (B, tokens, d) input, which would stay alive
            self.contexts.append(context.to("cpu", copy=True))
            values = score.max(1).values  # (B, H)
            kept = self.batch_images < self.keep_maxima
            if kept.any():
                self.maxima.append((values if score is h else h.amax(1))[kept].cpu())
            images = self.batch_images[:, None].expand_as(values)
            self._merge(values, images, None)
        else:
            cap = min(self.cap, h.shape[1])
            values, tokens = score.topk(cap, dim=1)  # (B, cap, H)
            batch, _, units = values.shape
            gathered = torch.gather(
                x[:, :, None, :].expand(batch, x.shape[1], units, x.shape[2]), 1,
                tokens[..., None].expand(batch, cap, units, x.shape[2]),
            )  # (B, cap, H, d)
            images = self.batch_images[:, None, None].expand(batch, cap, units)
            self._merge(values.reshape(-1, units), images.reshape(-1, units), gathered.reshape(-1, units, x.shape[2]))
        self.on_done()

    def _merge(self, values: torch.Tensor, images: torch.Tensor, descriptors: torch.Tensor | None) -> None:
        if self.values is not None:
            values = torch.cat([self.values, values])
            images = torch.cat([self.images, images])
            if descriptors is not None:
                descriptors = torch.cat([self.descriptors, descriptors])
        self.values, self.images, self.descriptors = top_m_merge(values, images, descriptors, self.top_m)

    def result(self, n_images: int, first_image: int) -> LayerActivations:
        assert self.values is not None and self.images is not None
        return LayerActivations(
            self.layer.path,
            self.values.cpu(),
            self.images.cpu(),
            self.descriptors.cpu() if self.descriptors is not None else None,
            torch.cat(self.contexts) if self.contexts else None,
            n_images,
            first_image,
            torch.cat(self.maxima) if self.maxima else None,
        )


def _layer_passes(layers: list[NeuronLayer], router: str, top_m: int, max_buffer_bytes: int) -> list[list[NeuronLayer]]:
    if router == "context":
        return [layers]
    passes: list[list[NeuronLayer]] = [[]]
    used = 0
    for layer in layers:
        need = 2 * top_m * layer.n_units * layer.d_in * 4  # kept + candidates during a merge
        if passes[-1] and used + need > max_buffer_bytes:
            passes.append([])
            used = 0
        passes[-1].append(layer)
        used += need
    return passes


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    layers: list[NeuronLayer],
    source: ImageSource,
    spec: InputSpec,
    router: str = "context",
    top_m: int = 256,
    per_image_cap: int = 2,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    max_buffer_bytes: int = 2 << 30,
    progress: bool = False,
    first_image: int = 0,
    keep_image_maxima: int = 0,
) -> dict[str, LayerActivations]:
    """Run the model over the source and keep each unit's top-M activations with descriptors.

    `first_image` is the global id of the source's first image (a shard's offset);
    `keep_image_maxima` (context router) keeps the per-unit maxima of images with lower ids.
    """
    if router not in ROUTERS:
        raise DataError(f"unknown router '{router}' (use {' or '.join(ROUTERS)})")
    device = torch.device(device)
    dtype = next(model.parameters()).dtype
    results: dict[str, LayerActivations] = {}
    passes = _layer_passes(layers, router, top_m, max_buffer_bytes)
    for number, group in enumerate(passes):
        streams = [_TopMStream(layer, router, top_m, per_image_cap, keep_image_maxima) for layer in group]
        handles = []
        for stream in streams:
            handles.append(stream.layer.input_module.register_forward_pre_hook(stream.on_input))
            handles.append(stream.layer.consumer.register_forward_pre_hook(stream.on_hidden))
        seen = 0
        remaining = [0]

        def one_done() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                raise _StopForward

        for stream in streams:
            stream.on_done = one_done
        try:
            label = f"calibrate {number + 1}/{len(passes)}" if len(passes) > 1 else "calibrate"
            for indices, batch in model_batches(source, spec, batch_size, device, dtype, limit, progress, label):
                image_ids = torch.as_tensor(indices + first_image, device=device)
                for stream in streams:
                    stream.batch_images = image_ids
                remaining[0] = len(streams)
                with suppress(_StopForward):  # raised once every layer of the pass has its activations
                    model(batch)
                seen += len(indices)
        finally:
            for handle in handles:
                handle.remove()
        if seen == 0:
            raise DataError(f"no calibration images in {source.name}")
        for stream in streams:
            if stream.values is None:
                raise DataError(f"layer {stream.layer.path} never ran during calibration: is it used in forward()?")
            results[stream.layer.path] = stream.result(seen, first_image)
    return results
