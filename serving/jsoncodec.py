"""Fast, strict JSON for the hot path: orjson when installed (numpy arrays natively), else the stdlib.

Both refuse NaN/infinity on output, so a response body is always valid JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

try:
    import orjson
except ImportError:  # the `serve` extra installs it; the stdlib keeps the server working without
    orjson = None


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def loads(data: bytes) -> Any:
    """Parse JSON; raises ValueError (orjson.JSONDecodeError and json.JSONDecodeError both are)."""
    if orjson is not None:
        return orjson.loads(data)
    return json.loads(data)


def dumps(value: Any) -> bytes:
    """Compact JSON bytes; numpy arrays allowed; NaN/inf raise ValueError instead of invalid JSON."""
    if orjson is not None:
        _reject_non_finite(value)
        return orjson.dumps(value, default=_default, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(value, default=_default, separators=(",", ":"), allow_nan=False).encode()


def _reject_non_finite(value: Any) -> None:
    # orjson writes NaN as null silently; the server promises an error instead
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"out of range float value {value!r} is not JSON compliant")
    if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
        raise ValueError("array with NaN or infinite values is not JSON compliant")
    if isinstance(value, dict):
        for item in value.values():
            _reject_non_finite(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _reject_non_finite(item)
