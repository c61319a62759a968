"""Typed errors for everything a user can get wrong.

The CLI turns any `EludeError` into a one-line message and a non-zero exit, so every
user-caused failure must raise one of these instead of leaking a library traceback.
"""

from __future__ import annotations


class EludeError(Exception):
    """Base class: a problem the user can fix (bad path, wrong model, corrupt file...)."""


class ModelLoadError(EludeError):
    """The model name, checkpoint or architecture cannot be loaded."""


class LayerMatchError(EludeError):
    """No neuron layer was found, or a `--layers` pattern matched nothing."""


class DataError(EludeError):
    """Calibration or evaluation data is missing, unreadable or has the wrong shape."""


class PlanError(EludeError):
    """A plan file is corrupt, of an unknown schema, or fitted on another model."""


class ExportError(EludeError):
    """The ONNX export could not be produced."""


class ValidationError(EludeError):
    """An exported model disagrees with the PyTorch model beyond tolerance."""
