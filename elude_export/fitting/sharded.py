"""Calibrate one shard of the images into a `CalibrationPart` (one process, one Ray task or one job).

A shard is loaded by reference (`ModelRef`: what the CLI was given) so that a remote worker
can rebuild exactly the model the driver has; the part records the model's weights
fingerprint and the calibration settings so that a merge can refuse parts that do not belong
together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from elude_export.data.sources import ImageSource, open_source
from elude_export.fitting.calibrate import collect_activations
from elude_export.fitting.parts import CalibrationPart
from elude_export.fitting.shards import Shard, ShardError
from elude_export.layers import find_layers
from elude_export.models import LoadedModel, fingerprint_model

CALIBRATION_FIELDS = ("router", "top_m", "per_image_cap", "batch_size", "limit", "layers")


@dataclass(frozen=True)
class ModelRef:
    """How to load the model again in another process."""

    name: str
    checkpoint: str | None = None
    pretrained: bool = False
    img_size: int | None = None

    def load(self) -> LoadedModel:
        from elude_export.models import load_model

        kwargs = {"img_size": self.img_size} if self.img_size else None
        return load_model(self.name, checkpoint=Path(self.checkpoint) if self.checkpoint else None,
                          pretrained=self.pretrained, model_kwargs=kwargs)


def calibration_settings(config: Any, data: str) -> dict[str, Any]:
    """What must agree between parts (and between the parts and the fit that merges them)."""
    values = asdict(config)
    return {"data": data, **{name: values[name] for name in CALIBRATION_FIELDS}}


def model_identity(loaded: LoadedModel) -> dict[str, Any]:
    import json

    return {"name": loaded.name, "fingerprint": fingerprint_model(loaded.model),
            "input": json.loads(loaded.input_spec.to_json())}


def calibrate_shard(
    loaded: LoadedModel, source: ImageSource, data: str, config: Any, shard: Shard,
    device: torch.device | str = "cpu", progress: bool = False,
) -> CalibrationPart:
    """Calibrate the images of `shard` (global ids kept) and return them as a mergeable part."""
    device = torch.device(device)
    total = len(source) if config.limit is None else min(len(source), config.limit)
    start, stop = shard.image_range(total, config.batch_size)
    if start >= stop:
        raise ShardError(f"shard {shard.label} has no images: {total} images make only "
                         f"{-(-total // config.batch_size)} batches of {config.batch_size}")
    model = loaded.model.eval().to(device)
    layers = find_layers(model, config.layers)
    acts = collect_activations(
        model, layers, source.subset(np.arange(start, stop)), loaded.input_spec, config.router, config.top_m,
        config.per_image_cap, config.batch_size, device, None, progress=progress, first_image=start,
    )
    return CalibrationPart(acts, model_identity(loaded), calibration_settings(config, data), shard, (start, stop))


def calibrate_shard_by_ref(ref: ModelRef, data: str, config: Any, shard: Shard, device: str = "cpu") -> CalibrationPart:
    """The unit of work of a remote worker: load model and data by name, calibrate one shard."""
    loaded = ref.load()
    source = open_source(data, (loaded.input_spec.height, loaded.input_spec.width))
    return calibrate_shard(loaded, source, data, config, shard, device)
