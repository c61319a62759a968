"""How images must be prepared for a model: carried into plans and the ONNX contract."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class InputSpec:
    """How images must be prepared for the model: carried into plans and ONNX metadata."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "InputSpec":
        raw = json.loads(text)
        return cls(
            channels=int(raw["channels"]),
            height=int(raw["height"]),
            width=int(raw["width"]),
            mean=tuple(float(v) for v in raw["mean"]),
            std=tuple(float(v) for v in raw["std"]),
        )
