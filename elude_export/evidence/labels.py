"""Labels: what every unit and sub-unit fires on, in words, so a deployed column is not just a number.

`compute_labels` ranks each column's images on a labelled set (the evaluation's top-n pass,
units and ELUDe only) and describes the top-n: the dominant concept (ground truth, where the
data has concepts; otherwise the class), its share with a Wilson interval, the runner-up and a
few top image ids. A column that fires on fewer than top-n images is "unlabelled": its top-n
would be padded with images it does not fire on.

The labels travel as a sidecar JSON file that carries the plan's fingerprint (`elude label`),
so that `elude export --labels` can refuse labels computed for another plan.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from elude_export.artifacts import check_output_path, write_json_atomic
from elude_export.data.sources import ImageSource
from elude_export.errors import DataError
from elude_export.export.contract import SubunitLabel
from elude_export.models import LoadedModel
from elude_export.plan import Plan

FORMAT = "elude-labels"
SCHEMA_VERSION = 1
UNLABELLED = "unlabelled"
TOP_IMAGES = 5  # image ids kept per label: enough to look at, small enough for the ONNX metadata


class LabelFileError(DataError):
    """A labels file is unreadable, of another schema, or belongs to another plan."""


@dataclass
class LabelSet:
    """The labels of one plan's columns, and what they were computed from."""

    plan_fingerprint: str
    data: str
    top_n: int
    basis: str  # "concept" or "class": what `dominant` names
    labels: dict[str, SubunitLabel]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "plan_fingerprint": self.plan_fingerprint,
                "data": self.data, "top_n": self.top_n, "basis": self.basis,
                "labels": {name: vars(label) for name, label in self.labels.items()}}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        check_output_path(path, DataError, "labels.json")
        return write_json_atomic(path, self.to_json(), DataError)

    def counts(self) -> tuple[int, int]:
        """(labelled, unlabelled) columns."""
        unlabelled = sum(label.text == UNLABELLED for label in self.labels.values())
        return len(self.labels) - unlabelled, unlabelled


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sane at shares near 0 or 1 and at small n."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def describe_top(categories: np.ndarray, names: Sequence[str], image_ids: np.ndarray,
                 classes: np.ndarray | None = None, class_names: Sequence[str] | None = None) -> SubunitLabel:
    """One column's label from the categories of its top-n images (best first)."""
    n = len(categories)
    counts = np.bincount(categories, minlength=len(names))
    order = np.argsort(-counts, kind="stable")
    dominant, share = names[order[0]], counts[order[0]] / n
    runner_up = names[order[1]] if len(order) > 1 and counts[order[1]] > 0 else None
    text = f"{dominant} ({share:.2f})"
    if classes is not None and class_names is not None:  # concepts named: add the class they vote for
        class_counts = np.bincount(classes)
        text += f", {class_names[int(class_counts.argmax())]} ({class_counts.max() / n:.2f})"
    low, high = wilson_interval(int(counts[order[0]]), n)
    return SubunitLabel(text=text, dominant=dominant, share=round(float(share), 4),
                        ci=[round(low, 4), round(high, 4)], runner_up=runner_up,
                        top_images=[int(i) for i in image_ids[:TOP_IMAGES]], n=n)


def label_columns(names: Sequence[str], images: np.ndarray, active: np.ndarray, source: ImageSource,
                  top_n: int) -> dict[str, SubunitLabel]:
    """Labels of columns given their (>= top_n, C) top image ids (best first) and firing counts."""
    categories, category_names, basis = label_basis(source)
    class_names = _class_names(source) if basis == "concept" else None
    out = {}
    for column, name in enumerate(names):
        fired = int(active[column])
        if fired < top_n or images.shape[0] < top_n:
            out[name] = SubunitLabel(text=UNLABELLED, n=fired)
            continue
        top = images[:top_n, column]
        out[name] = describe_top(categories[top], category_names, top,
                                 None if class_names is None else source.labels[top], class_names)
    return out


def label_basis(source: ImageSource) -> tuple[np.ndarray, list[str], str]:
    """What a label names: ground-truth concepts where the data has them, else the classes."""
    if source.concepts is not None:
        from elude_export.data.concepts import N_CONCEPTS, concept_name

        return np.asarray(source.concepts), [concept_name(c) for c in range(N_CONCEPTS)], "concept"
    if source.labels is None:
        raise DataError(f"data {source.name} has no labels: labels need a labelled set (e.g. embedded:test)")
    return np.asarray(source.labels), _class_names(source), "class"


def _class_names(source: ImageSource) -> list[str]:
    assert source.labels is not None
    n_classes = int(np.asarray(source.labels).max()) + 1
    names = list(source.class_names or [])
    return names + [f"class {i}" for i in range(len(names), n_classes)]


@torch.no_grad()
def compute_labels(loaded: LoadedModel, plan: Plan, source: ImageSource, top_n: int = 20,
                   layers: list[str] | None = None, batch_size: int = 64, limit: int | None = None,
                   device: torch.device | str = "cpu", log: Callable[[str], None] = lambda _m: None) -> LabelSet:
    """Labels of every unit and sub-unit of the plan's (or the given) layers on a labelled set.

    One forward of the rewritten model per batch serves both families: with every steer at 1
    its layers read the original `h` bit for bit (units) and tap the sub-units (ELUDe), so
    labels cost a third of an evaluation pass (no original-model forward, no embeddings).
    """
    from elude_export.evidence.baselines.base import image_max, unit_columns
    from elude_export.evidence.collect import RunningTopN
    from elude_export.models import model_batches
    from elude_export.rewrite import apply_plan, disentangled_layers
    from elude_export.vocabulary import IMAGE_POOLING

    if source.labels is None:
        raise DataError(f"data {source.name} has no labels: labels need a labelled set (e.g. embedded:test)")
    device = torch.device(device)
    paths = layers or [layer.path for layer in plan.layers]
    model = loaded.model.eval().to(device)
    rewritten = apply_plan(model, plan, layers=paths, poolings=(IMAGE_POOLING,)).to(device)
    rewritten_layers = disentangled_layers(rewritten)
    unit_max: dict[str, torch.Tensor] = {}
    handles = [layer.consumer.register_forward_pre_hook(
        lambda module, args, path=path: unit_max.__setitem__(path, image_max(module.tokens(args[0]))))
        for path, layer in rewritten_layers.items()]
    tops = {path: (RunningTopN(top_n), RunningTopN(top_n)) for path in paths}
    dtype = next(model.parameters()).dtype
    try:
        for indices, batch in model_batches(source, loaded.input_spec, batch_size, device, dtype, limit):
            rewritten(batch)
            ids = torch.as_tensor(indices)
            for path, (units, subunits) in tops.items():
                units.update(unit_max[path], ids)
                subunits.update(rewritten_layers[path].taps[IMAGE_POOLING], ids)
    finally:
        for handle in handles:
            handle.remove()
    labels: dict[str, SubunitLabel] = {}
    for path, pair in tops.items():
        layer = plan.layer(path)
        for names, top in zip((unit_columns(layer).names, layer.subunit_names()), pair):
            if top.images is None or top.active is None:
                raise DataError(f"no images in {source.name}")
            labels.update(label_columns(names, top.images.numpy(), top.active.numpy(), source, top_n))
    log(f"labelled {len(labels)} columns on {source.name}")
    return LabelSet(plan.fingerprint(), source.name, top_n, label_basis(source)[2], labels)


def load_labels(path: str | Path, plan_fingerprint: str | None = None) -> LabelSet:
    """Read a labels file; refuse a truncated or foreign file, or one computed for another plan."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"labels file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LabelFileError(f"{path} is not valid JSON (truncated or corrupt?): {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise LabelFileError(f"{path} is not an ELUDe labels file (expected \"format\": \"{FORMAT}\"; "
                             "write one with `elude label`)")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise LabelFileError(f"{path}: labels schema {raw.get('schema_version')!r} is not supported "
                             f"(expected {SCHEMA_VERSION})")
    if plan_fingerprint is not None and raw.get("plan_fingerprint") != plan_fingerprint:
        raise LabelFileError(f"{path} was computed for another plan (fingerprint {raw.get('plan_fingerprint')}, "
                             f"this plan {plan_fingerprint}): run `elude label` on this plan")
    entries = raw.get("labels")
    if not isinstance(entries, dict):
        raise LabelFileError(f"{path}: \"labels\" must be an object of name -> label")
    try:
        labels = {str(name): _checked_label(entry) for name, entry in entries.items()}
        return LabelSet(str(raw["plan_fingerprint"]), str(raw.get("data", "")), int(raw.get("top_n", 0)),
                        str(raw.get("basis", "")), labels)
    except (KeyError, TypeError, ValueError) as exc:
        raise LabelFileError(f"{path}: malformed label entry ({exc})") from exc


def labels_from_file(path: str | Path, plan_fingerprint: str | None = None) -> dict[str, SubunitLabel]:
    """Labels from `elude label`'s JSON or from an exported `.onnx` (its `elude.labels` metadata), checked."""
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        return load_labels(path, plan_fingerprint).labels
    from elude_export.export.contract import read_contract

    try:
        contract = read_contract(path)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        raise LabelFileError(f"cannot read labels from {path}: {exc}") from exc
    if plan_fingerprint is not None and contract.plan_fingerprint != plan_fingerprint:
        raise LabelFileError(f"{path} was exported from another plan (fingerprint {contract.plan_fingerprint}, "
                             f"this plan {plan_fingerprint})")
    if not contract.labels:
        raise LabelFileError(f"{path} carries no labels (export it with `elude export --labels labels.json`)")
    return contract.labels


def _checked_label(entry: Any) -> SubunitLabel:
    if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
        raise ValueError("every label needs a string \"text\"")
    label = SubunitLabel.from_json(entry)
    if not isinstance(label.top_images, list) or not all(isinstance(i, int) for i in label.top_images):
        raise ValueError("\"top_images\" must be a list of image ids")
    return label


def labels_by_name(labels: Mapping[str, SubunitLabel] | LabelSet | None) -> Mapping[str, SubunitLabel]:
    """Accept a LabelSet, a plain mapping or nothing."""
    if labels is None:
        return {}
    return labels.labels if isinstance(labels, LabelSet) else labels
