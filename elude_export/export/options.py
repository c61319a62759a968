"""How a graph is exported, as one value: given to `export_onnx`, recorded in `elude.export`.

Torch-free (the server and the Triton writer read it back from the file). What is recorded
is what was used: `low_rank` is true only where the plan had routing factors to use, and
`exporter` names the exporter that produced the graph (`dynamo` or `torchscript`, never `auto`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from elude_export.errors import ExportError
from elude_export.vocabulary import MODES

STEER_LAYOUTS = ("shared", "per_image")  # (n_subunits,) for the batch, or (steer_batch, n_subunits)
EXPORTERS = ("auto", "dynamo", "torchscript")
DEFAULT_OPSET = 18
OPSETS = range(17, 24)  # what torch.onnx and onnxruntime >= 1.18 both handle


@dataclass(frozen=True)
class ExportOptions:
    """Everything about an export that changes the graph; invalid values raise ExportError."""

    mode: str = "fused"
    low_rank: bool = True
    steer_layout: str = "shared"
    opset: int = DEFAULT_OPSET
    exporter: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ExportError(f"unknown mode {self.mode!r} (use {' or '.join(MODES)})")
        if not isinstance(self.low_rank, bool):
            raise ExportError(f"low_rank must be true or false, not {self.low_rank!r}")
        if self.steer_layout not in STEER_LAYOUTS:
            raise ExportError(f"unknown steer layout {self.steer_layout!r} (use {' or '.join(STEER_LAYOUTS)})")
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset not in OPSETS:
            raise ExportError(f"opset {self.opset!r} is not supported (use {OPSETS[0]}..{OPSETS[-1]}; "
                              f"default {DEFAULT_OPSET})")
        if self.exporter not in EXPORTERS:
            raise ExportError(f"unknown exporter {self.exporter!r} (use {', '.join(EXPORTERS)})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "ExportOptions":
        """Parse `elude.export`; None (files written before it existed) gives the defaults."""
        if text is None:
            return cls()
        try:
            raw: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ExportError(f"elude.export is not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ExportError(f"elude.export must be a JSON object, not {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ExportError(f"unknown export option(s) {', '.join(unknown)} in elude.export "
                              f"(known: {', '.join(sorted(known))})")
        return cls(**raw)
