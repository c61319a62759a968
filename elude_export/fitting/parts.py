"""Calibration as a mergeable summary: one safetensors part per shard, merged exactly.

A part holds, per layer, the shard's top-M values, their global image ids, and the token
descriptors (token router) or the shard's rows of the image-context table (context router),
plus a JSON header naming the model (fingerprint), the layers, the calibration settings and
the shard. Merging concatenates the parts and keeps the top-M under the same total order the
streaming calibration uses (`calibrate.top_m_merge`), so n parts give exactly what one process
gives over all images when shards are cut on batch boundaries (`shards.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from elude_export.artifacts import write_file_atomic
from elude_export.fitting.calibrate import LayerActivations, top_m_merge
from elude_export.fitting.shards import Shard, ShardError

PART_FORMAT = "elude-calibration-part"
PART_VERSION = 1
_FIELDS = ("top_values", "top_images", "descriptors", "contexts")


@dataclass
class CalibrationPart:
    """One shard's calibration state and what it was computed from."""

    activations: dict[str, LayerActivations]
    model: dict[str, Any]  # name, fingerprint, input spec
    settings: dict[str, Any]  # data spec, router, top_m, per_image_cap, batch_size, limit, layers
    shard: Shard
    image_range: tuple[int, int]

    def header(self) -> dict[str, Any]:
        return {"format": PART_FORMAT, "version": PART_VERSION, "model": self.model, "settings": self.settings,
                "layers": list(self.activations), "shard": [self.shard.index, self.shard.count],
                "image_range": list(self.image_range)}

    def save(self, path: str | Path) -> Path:
        """Write atomically (a crash leaves no half-written part for a merge to pick up)."""
        from safetensors.torch import save_file

        tensors = {f"{layer}.{name}": getattr(acts, name).contiguous()
                   for layer, acts in self.activations.items() for name in _FIELDS
                   if getattr(acts, name) is not None}
        metadata = {"elude.calibration": json.dumps(self.header())}
        return write_file_atomic(path, lambda temp: save_file(tensors, str(temp), metadata=metadata), ShardError)


def load_part(path: str | Path) -> CalibrationPart:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ShardError(f"calibration part not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get("elude.calibration", "null"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ShardError(f"{path} is not a readable calibration part: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != PART_FORMAT:
        raise ShardError(f"{path} is not an ELUDe calibration part (write one with `elude calibrate`)")
    if header.get("version") != PART_VERSION:
        raise ShardError(f"{path}: calibration part version {header.get('version')} is not {PART_VERSION}")
    start, stop = header["image_range"]
    acts = {layer: LayerActivations(layer, *(tensors.get(f"{layer}.{name}") for name in _FIELDS),
                                    n_images=stop - start, first_image=start)
            for layer in header["layers"]}
    return CalibrationPart(acts, header["model"], header["settings"], Shard(*header["shard"]), (start, stop))


def merge_parts(parts: list[CalibrationPart], names: list[str] | None = None) -> CalibrationPart:
    """One calibration over all shards; refuses parts of other models/settings, overlaps and gaps."""
    if not parts:
        raise ShardError("no calibration parts given")
    names = names or [f"part {i}" for i in range(len(parts))]
    first = parts[0]
    for part, name in zip(parts, names):
        for what, mine, theirs in (("model", part.model, first.model), ("settings", part.settings, first.settings),
                                   ("layers", list(part.activations), list(first.activations))):
            if mine != theirs:
                raise ShardError(f"{name} has other {what} than {names[0]}: {_difference(mine, theirs)}")
        if part.shard.count != first.shard.count:
            raise ShardError(f"{name} is shard {part.shard.label}, {names[0]} is shard {first.shard.label}")
    by_index: dict[int, str] = {}
    for part, name in zip(parts, names):
        if part.shard.index in by_index:
            raise ShardError(f"overlapping parts: {by_index[part.shard.index]} and {name} are both shard "
                             f"{part.shard.label}")
        by_index[part.shard.index] = name
    missing = sorted(set(range(first.shard.count)) - set(by_index))
    if missing:
        raise ShardError("missing shard(s) " + ", ".join(f"{i}/{first.shard.count}" for i in missing))
    ordered = sorted(parts, key=lambda part: part.shard.index)
    for previous, current in zip(ordered[:-1], ordered[1:]):
        if previous.image_range[1] != current.image_range[0]:
            raise ShardError(f"shards {previous.shard.label} and {current.shard.label} do not cover adjacent images")
    top_m = int(first.settings["top_m"])
    merged = {layer: _merge_layer([part.activations[layer] for part in ordered], top_m) for layer in first.activations}
    span = (ordered[0].image_range[0], ordered[-1].image_range[1])
    return CalibrationPart(merged, first.model, first.settings, Shard(0, 1), span)


def _merge_layer(pieces: list[LayerActivations], top_m: int) -> LayerActivations:
    cat = (lambda name: None if getattr(pieces[0], name) is None else torch.cat([getattr(p, name) for p in pieces]))
    values, images, descriptors = top_m_merge(cat("top_values"), cat("top_images"), cat("descriptors"), top_m)
    return LayerActivations(pieces[0].path, values, images, descriptors, cat("contexts"),
                            sum(p.n_images for p in pieces), pieces[0].first_image)


def _difference(mine: Any, theirs: Any) -> str:
    if isinstance(mine, dict) and isinstance(theirs, dict):
        keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        return ", ".join(f"{k}={mine.get(k)!r} vs {theirs.get(k)!r}" for k in keys)
    return f"{mine!r} vs {theirs!r}"
