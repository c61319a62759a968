"""The exported model's contract: names and `metadata_props` of an ELUDe ONNX file.

Written by the exporter, read by `validate`, the server, the Triton python backend and any
consumer that holds only the `.onnx` file. Deliberately torch-free (json + numpy only).

Graph interface
- input `input`: float32 (batch, C, H, W), preprocessed as `elude.input` says;
- original outputs keep their names: `logits` (classifiers) or `embedding`;
- taps: `tap.<layer>.<pooling>` (batch, n_subunits) for pooling in max/mean/cls, and
  optionally `tap.<layer>.tokens` (batch, tokens, n_subunits);
- steering: optional input `steer.<layer>` (n_subunits,) float32, defaults to ones.

metadata_props keys (all JSON strings unless noted)
- `elude.schema_version` (plain int string), `elude.model_name`, `elude.model_fingerprint`,
  `elude.plan_fingerprint` (plain strings);
- `elude.input`: {"channels","height","width","mean","std"};
- `elude.outputs`: list of original output names;
- `elude.router`: "context" | "token" (plain string);
- `elude.layers`: list of {"path","n_units","n_subunits","steer_input","subunits":[names],
  "unit":[parent unit per column],"sub":[sub index per column]};
- `elude.taps`: list of {"output","layer","pooling"};
- `elude.baseline`: {"quantile_levels":[...], "layers": {path: {"threshold":[per unit],
  "fire_rate":[per sub-unit], "mean":[...], "quantiles":[[per sub-unit L values]],
  "bin_fraction":[[L+1 values]]}}} (calibration statistics for monitoring);
- `elude.versions`: {"elude","torch","timm","onnx","opset","exporter"};
- `elude.export` (added by the exporter; absent in older files, read as the defaults): the
  `ExportOptions` used, {"mode": "fused"|"explicit", "low_rank": bool, "steer_layout":
  "shared"|"per_image", "opset": int, "exporter": "dynamo"|"torchscript"}. `shared`: steer
  inputs are (n_subunits,) as above; `per_image`: (steer_batch, n_subunits), default
  (1, n_subunits), one row per image or one row for all (the layout a batching server such as
  Triton needs).
- `elude.labels` (optional; absent when the plan was not labelled): {sub-unit or unit name:
  {"text": short human-readable label, e.g. "red circle (0.91)", plus optional "dominant",
  "share", "ci", "runner_up", "top_images", "n"}}; what `elude label` computed from a labelled
  set. Readers treat a missing key as "unlabelled". Only labels of the exported layers are
  written, within `LABELS_MAX_BYTES` (2 MB) of JSON: when the full labels do not fit, the
  exporter drops, in this order and for every label alike, `top_images`, then `ci` and
  `runner_up`, then everything but `text`; if even the texts do not fit, unit labels are
  dropped (sub-unit labels kept), then the labels of the last sub-units in name order, so
  that every written label is complete at its level (`labels_metadata`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elude_export.errors import ExportError
from elude_export.export.options import ExportOptions

SCHEMA_VERSION = 1
INPUT_NAME = "input"
BATCH_DIM = "batch"  # the dynamic axis of `input` and of every output
STEER_BATCH_DIM = "steer_batch"  # the dynamic axis of per-image steer inputs
PREFIX = "elude."


@dataclass
class LayerInfo:
    path: str
    n_units: int
    n_subunits: int
    steer_input: str
    subunits: list[str]
    unit: list[int]
    sub: list[int]


@dataclass
class TapInfo:
    output: str
    layer: str
    pooling: str


@dataclass
class LayerBaseline:
    """Calibration statistics of one layer's sub-units (max-pooled taps)."""

    threshold: np.ndarray  # (n_units,)
    fire_rate: np.ndarray  # (n_subunits,)
    mean: np.ndarray  # (n_subunits,)
    quantiles: np.ndarray  # (n_subunits, L)
    bin_fraction: np.ndarray  # (n_subunits, L + 1)


@dataclass
class SubunitLabel:
    """What a unit or sub-unit fires on, as measured on a labelled set (`elude label`)."""

    text: str  # short, for people: "red circle (0.91)"; "unlabelled" when nothing dominates
    dominant: str | None = None  # the dominant class / concept name
    share: float | None = None  # its share of the top-n images
    ci: list[float] | None = None  # confidence interval of the share
    runner_up: str | None = None
    top_images: list[int] = field(default_factory=list)  # ids of a few top images in the labelled set
    n: int = 0  # top-n images the label was computed from

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "SubunitLabel":
        return cls(**{key: raw[key] for key in raw if key in cls.__dataclass_fields__})


LABELS_MAX_BYTES = 2_000_000  # the `elude.labels` JSON; ONNX metadata is loaded with the model
_LABEL_LEVELS = (  # what is kept of every label, richest first
    ("text", "dominant", "share", "ci", "runner_up", "top_images", "n"),
    ("text", "dominant", "share", "ci", "runner_up", "n"),
    ("text", "dominant", "share", "n"),
    ("text",),
)


def labels_for_layers(labels: dict[str, SubunitLabel], layers: list[str]) -> dict[str, SubunitLabel]:
    """The labels of units and sub-units of the given layers (names are `<layer>/<unit>[.<sub>]`)."""
    wanted = set(layers)
    return {name: label for name, label in labels.items() if name.rsplit("/", 1)[0] in wanted}


def labels_metadata(labels: dict[str, SubunitLabel], max_bytes: int = LABELS_MAX_BYTES) -> str:
    """`elude.labels` as JSON of at most `max_bytes`, truncated as the module docstring says."""
    for keys in _LABEL_LEVELS:
        text = json.dumps({name: {k: getattr(label, k) for k in keys} for name, label in labels.items()})
        if len(text.encode("utf-8")) <= max_bytes:
            return text
    subunits = sorted(name for name in labels if "." in name.rsplit("/", 1)[-1])
    kept: dict[str, dict[str, str]] = {}
    size = 2  # the outer braces
    for name in subunits:
        entry = json.dumps({name: {"text": labels[name].text}})
        size += len(entry.encode("utf-8"))  # the entry without its braces (-2), plus the ", " before it (+2)
        if size > max_bytes:
            break
        kept[name] = {"text": labels[name].text}
    return json.dumps(kept)


@dataclass
class OnnxContract:
    model_name: str
    model_fingerprint: str
    plan_fingerprint: str
    input: dict[str, Any]
    outputs: list[str]
    router: str
    layers: list[LayerInfo]
    taps: list[TapInfo]
    quantile_levels: list[float] = field(default_factory=list)
    baseline: dict[str, LayerBaseline] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    export: ExportOptions = field(default_factory=ExportOptions)
    labels: dict[str, SubunitLabel] = field(default_factory=dict)  # name -> label; empty if unlabelled

    def label_text(self, name: str) -> str | None:
        """The short label of a sub-unit (or unit) name, None when the export carries none."""
        label = self.labels.get(name)
        return label.text if label is not None else None

    def layer(self, path: str) -> LayerInfo:
        for info in self.layers:
            if info.path == path:
                return info
        raise KeyError(f"no layer '{path}' in this model (layers: {', '.join(l.path for l in self.layers)})")

    def subunit_index(self) -> dict[str, tuple[str, int]]:
        """sub-unit name -> (layer path, column): names every tap/steer column."""
        return {name: (info.path, column) for info in self.layers for column, name in enumerate(info.subunits)}

    def to_metadata_props(self) -> dict[str, str]:
        baseline = {
            "quantile_levels": self.quantile_levels,
            "layers": {path: {k: np.asarray(v).round(6).tolist() for k, v in vars(b).items()}
                       for path, b in self.baseline.items()},
        }
        return {
            f"{PREFIX}schema_version": str(self.schema_version),
            f"{PREFIX}model_name": self.model_name,
            f"{PREFIX}model_fingerprint": self.model_fingerprint,
            f"{PREFIX}plan_fingerprint": self.plan_fingerprint,
            f"{PREFIX}input": json.dumps(self.input),
            f"{PREFIX}outputs": json.dumps(self.outputs),
            f"{PREFIX}router": self.router,
            f"{PREFIX}layers": json.dumps([vars(info) for info in self.layers]),
            f"{PREFIX}taps": json.dumps([vars(tap) for tap in self.taps]),
            f"{PREFIX}baseline": json.dumps(baseline),
            f"{PREFIX}versions": json.dumps(self.versions),
            f"{PREFIX}export": self.export.to_json(),
            **({f"{PREFIX}labels": labels_metadata(self.labels)} if self.labels else {}),
        }

    @classmethod
    def from_metadata_props(cls, props: dict[str, str]) -> "OnnxContract":
        """Parse metadata; a model without (or with a newer) ELUDe contract raises ValueError."""
        version = props.get(f"{PREFIX}schema_version")
        if version is None:
            raise ValueError("not an ELUDe export: no elude.* metadata in this ONNX model")
        if int(version) != SCHEMA_VERSION:
            raise ValueError(f"ELUDe ONNX contract version {version} is not supported (expected {SCHEMA_VERSION})")
        try:
            raw_baseline = json.loads(props.get(f"{PREFIX}baseline", "{}"))
            baseline = {
                path: LayerBaseline(**{k: np.asarray(v, dtype=np.float32) for k, v in values.items()})
                for path, values in raw_baseline.get("layers", {}).items()
            }
            return cls(
                model_name=props[f"{PREFIX}model_name"],
                model_fingerprint=props[f"{PREFIX}model_fingerprint"],
                plan_fingerprint=props[f"{PREFIX}plan_fingerprint"],
                input=json.loads(props[f"{PREFIX}input"]),
                outputs=json.loads(props[f"{PREFIX}outputs"]),
                router=props[f"{PREFIX}router"],
                layers=[LayerInfo(**entry) for entry in json.loads(props[f"{PREFIX}layers"])],
                taps=[TapInfo(**entry) for entry in json.loads(props[f"{PREFIX}taps"])],
                quantile_levels=list(raw_baseline.get("quantile_levels", [])),
                baseline=baseline,
                versions=json.loads(props.get(f"{PREFIX}versions", "{}")),
                schema_version=int(version),
                export=ExportOptions.from_json(props.get(f"{PREFIX}export")),
                labels={name: SubunitLabel.from_json(raw)
                        for name, raw in json.loads(props.get(f"{PREFIX}labels", "{}")).items()},
            )
        except (KeyError, TypeError, json.JSONDecodeError, ExportError) as exc:
            raise ValueError(f"malformed ELUDe metadata: {exc}") from exc


def read_contract(onnx_path: str | Path) -> OnnxContract:
    """Read the contract from an .onnx file without loading its weights."""
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable ONNX model: {exc}") from exc
    return OnnxContract.from_metadata_props({p.key: p.value for p in model.metadata_props})
