"""The names and small rules that two stages must agree on, defined once (torch-free).

The fit writes them into the plan, the rewrite and the exporter build graphs from them, and
the server reads them back from the ONNX contract; nobody re-spells them.
"""

from __future__ import annotations

from elude_export.errors import PlanError

ROUTERS = ("context", "token")  # route every token by its image's context, or each token by itself
CONTEXT_TOKENS = ("cls", "mean")  # what an image's context vector is: the class token, or the mean token
MODES = ("fused", "explicit")  # fused: fc2(h * steer), bitwise; explicit: fc2 over the sub-unit vector
POOLINGS = ("max", "mean", "cls")  # image-level taps: max / mean over tokens, or the class token
TOKEN_TAP = "tokens"  # the token-level tap (batch, tokens, n_subunits)
TAP_KINDS = (*POOLINGS, TOKEN_TAP)
# the image pooling that fire thresholds, monitoring baselines, evaluation and steering use
IMAGE_POOLING = "max"


def unit_name_width(n_units: int) -> int:
    """Digits of a unit index in names: at least 4, so names sort and line up."""
    return max(4, len(str(max(n_units, 1) - 1)))


def unit_name(path: str, unit: int, n_units: int) -> str:
    """`blocks.3.mlp/0042`: a unit (neuron) of a layer."""
    return f"{path}/{unit:0{unit_name_width(n_units)}d}"


def subunit_name(path: str, unit: int, sub: int, n_units: int) -> str:
    """`blocks.3.mlp/0042.1`: sub-unit 1 of unit 42; stable across fits of the same layer size."""
    return f"{unit_name(path, unit, n_units)}.{sub}"


def parse_subunit_name(name: str) -> tuple[str, int, int]:
    """Inverse of `subunit_name`: (layer path, unit, sub-unit)."""
    try:
        path, rest = name.rsplit("/", 1)
        unit, sub = rest.split(".")
        return path, int(unit), int(sub)
    except ValueError as exc:
        raise PlanError(f"'{name}' is not a sub-unit name (expected '<layer>/<unit>.<sub>')") from exc


def tap_output_name(layer: str, kind: str) -> str:
    """ONNX output of a tap: `tap.blocks.3.mlp.max`."""
    return f"tap.{layer}.{kind}"


def steer_input_name(layer: str) -> str:
    """ONNX input that steers a layer's sub-units: `steer.blocks.3.mlp`."""
    return f"steer.{layer}"
