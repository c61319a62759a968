"""elude-export: lossless disentanglement of polysemantic MLP neurons, exported to ONNX.

Pipeline: images -> calibrate -> fit -> Plan -> rewrite -> export -> validate -> serve.
Public names are functions and classes, never submodules, and are imported lazily so that
light consumers (the server reads only the ONNX contract) never pay for torch or the fitting
code. No stage package shares a name with a public function (`fitting/` holds `fit`,
`evidence/` holds `evaluate`), so importing a submodule can never shadow one.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "EludeError": "elude_export.errors",
    "open_source": "elude_export.data.sources",
    "FitConfig": "elude_export.fitting.fit",
    "fit": "elude_export.fitting.fit",
    "load_model": "elude_export.models",
    "Plan": "elude_export.plan",
    "load_plan": "elude_export.plan",
    "apply_plan": "elude_export.rewrite",
    "read_taps": "elude_export.rewrite",
    "set_steers": "elude_export.rewrite",
    "reset_steers": "elude_export.rewrite",
    "ExportOptions": "elude_export.export.options",
    "export_onnx": "elude_export.export.onnx_export",
    "validate_export": "elude_export.export.validate",
    "write_triton_repository": "elude_export.export.triton",
    "evaluate": "elude_export.evidence.evaluate",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # resolved once; later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'elude_export' has no attribute {name!r}")
