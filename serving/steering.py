"""Steering by sub-unit name -> the `steer.<layer>` vectors of an ELUDe export.

Pure numpy on the contract, so a Triton client builds the same vectors the server feeds:

    vectors = steer_vectors(read_contract("model.onnx"), {"blocks.3.mlp/0042.1": 0.0})
    # {"blocks.3.mlp": array([1., ..., 0., ...], dtype=float32)} -> send as input "steer.blocks.3.mlp"
"""

from __future__ import annotations

import math
from typing import Collection, Mapping

import numpy as np

from elude_export.export.contract import OnnxContract


FLOAT32_MAX = float(np.finfo(np.float32).max)


class UnknownSubunit(ValueError):
    """A name that is not in the model's sub-unit table."""


class InvalidSteering(ValueError):
    """A scale that is not a finite number, or a layer exported without a steer input."""


def steer_vectors(contract: OnnxContract, named: Mapping[str, object],
                  steerable: Collection[str] | None = None,
                  start: Mapping[str, np.ndarray] | None = None,
                  index: Mapping[str, tuple[str, int]] | None = None) -> dict[str, np.ndarray]:
    """{layer: (n_subunits,) float32} with each named sub-unit's column scaled (ones elsewhere).

    `steerable`: layers that have a steer input (default: every layer with one in the contract);
    `start`: vectors to scale further (e.g. steer tensors a client sent). Only layers touched
    by `named` or `start` appear; a vector of all ones is dropped (it is no steering). `index`:
    a cached `contract.subunit_index()` (rebuilding it per request costs on big models).
    """
    index = index if index is not None else contract.subunit_index()
    steerable = set(steerable if steerable is not None else (l.path for l in contract.layers if l.steer_input))
    sizes = {info.path: info.n_subunits for info in contract.layers}
    vectors = {layer: np.array(v, dtype=np.float32).reshape(sizes[layer]) for layer, v in (start or {}).items()}
    for sub_unit, scale in named.items():
        if sub_unit not in index:
            example = next(iter(index), "layer/0000.0")
            raise UnknownSubunit(f"unknown sub-unit '{sub_unit}' (names look like '{example}')")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or abs(scale) > FLOAT32_MAX:
            raise InvalidSteering(f"steer scale of '{sub_unit}' must be a finite number within float32 range, got {scale!r}")
        layer, column = index[sub_unit]
        if layer not in steerable:
            raise InvalidSteering(f"layer '{layer}' was exported without a steer input; it cannot be steered")
        vector = vectors.setdefault(layer, np.ones(sizes[layer], dtype=np.float32))
        vector[column] *= np.float32(scale)
    return {layer: v for layer, v in vectors.items() if not np.all(v == 1.0)}
