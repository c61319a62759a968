"""The protocol every family of columns in an evaluation follows.

An evaluation scores *columns* (units, ELUDe sub-units, controls, SAE latents, ...) by their
top-n images. Each family is one `Baseline` subclass in its own file, registered with
`@register_baseline` (registry.py). `evaluate()`, the summaries, the table and the report
iterate the registered families and read the flags below; none of them names a method. A
family sees what the one shared forward pass computed (`SharedForward`) and returns its
image-level column activations per layer; top-n tracking, scoring and statistics are common.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from elude_export.layers import NeuronLayer, context_vector
from elude_export.vocabulary import unit_name

if TYPE_CHECKING:
    from elude_export.data.sources import ImageSource
    from elude_export.evidence.evaluate import EvalConfig
    from elude_export.models import LoadedModel
    from elude_export.plan import LayerPlan, Plan

UNITS = "units"  # the reference: every other family is compared with the original units
ELUDE = "elude"  # the subject: every control is compared with ELUDe's sub-units


def delta_key(reference: str) -> str:
    """Summary-row key of the differences to `reference` (e.g. `delta_vs_units`)."""
    return f"delta_vs_{reference}"


@dataclass(frozen=True)
class EvalSetup:
    """What a baseline may use to prepare itself; built once per evaluation and shared by all."""

    loaded: LoadedModel
    model: nn.Module  # the original model, in eval mode, on `device`
    plan: Plan
    layers: dict[str, LayerPlan]  # the evaluated plan layers, in evaluation order
    neuron_layers: dict[str, NeuronLayer]
    config: EvalConfig
    device: torch.device
    fit_source: ImageSource | None  # the plan's fit data, for baselines that train (the SAE)
    log: Callable[[str], None]


@dataclass(frozen=True)
class SharedForward:
    """What the shared forward pass computed on one batch, so that no baseline recomputes it."""

    batch: torch.Tensor  # normalised images, on the device
    labels: torch.Tensor
    ids: torch.Tensor  # dataset indices of the images
    logits: torch.Tensor  # of the original model
    hidden: dict[str, torch.Tensor]  # per layer, what the consumer (fc2) reads, as tokens (B, T, H) (`to_tokens`)
    rewritten_logits: torch.Tensor  # of the ELUDe-rewritten model
    taps: dict[str, torch.Tensor]  # per layer, the rewritten model's image taps (B, S), IMAGE_POOLING
    routes: dict[str, torch.Tensor]  # per layer in module order, its router output: (B, H) or (B, T, H)
    contexts: dict[str, torch.Tensor]  # per layer, the original model's image context of its input (B, d)


@dataclass(frozen=True)
class Columns:
    """How one layer's columns of a family relate to the units."""

    parent: np.ndarray  # (C,) parent unit; an unpaired family's column is its own group
    split: np.ndarray  # (C,) the parent unit has K > 1
    names: list[str]


def image_context(layer: NeuronLayer, x: torch.Tensor) -> torch.Tensor:
    """(B, d) float context of a layer input, by the layer's own routing-context rule."""
    return context_vector(layer.to_tokens(x), layer.context_token).float()


def image_max(h: torch.Tensor) -> torch.Tensor:
    """(B, T, H) tokens (or (B, H)) -> (B, H) image activation: the max over tokens, as the IMAGE_POOLING tap.

    A feature map must be converted first (`NeuronLayer.to_tokens`): its channels are not last.
    """
    return (h if h.ndim == 3 else h.unsqueeze(1)).float().amax(1)


def unit_columns(layer: LayerPlan, units: np.ndarray | None = None) -> Columns:
    """Columns that are the layer's units themselves (default: all of them, in order)."""
    units = np.arange(layer.n_units) if units is None else np.asarray(units)
    split = (layer.k > 1).numpy()[units]
    return Columns(units, split, [unit_name(layer.path, int(j), layer.n_units) for j in units])


class Baseline(ABC):
    """One family of columns: how it is prepared, what it activates on, how it is compared.

    Flags (class attributes) decide the comparisons, so that a new family is one file:
    - `is_control`: ELUDe's rows get `delta_vs_<name>` and the table an `elude - <name>` line;
      a control keeps every unit's K_j and its `description` goes into the table's legend.
    - `paired_with_units`: `parent` indexes the units, so differences to the units resample
      the same units for both (an SAE latent has no parent unit: unpaired).
    - `has_split_scope`: also summarised over the columns of split units only.
    - `splits_units`: the columns are sub-units of the plan's units: route balance is reported.
    - `info_key`: the key of this family's per-layer record in the result (`layer_info`).
    """

    name: ClassVar[str]
    color: ClassVar[str | None] = None  # histogram colour in the report; None: matplotlib's next
    description: ClassVar[str] = ""
    is_control: ClassVar[bool] = False
    paired_with_units: ClassVar[bool] = True
    has_split_scope: ClassVar[bool] = True
    splits_units: ClassVar[bool] = False
    info_key: ClassVar[str | None] = None

    def __init__(self, setup: EvalSetup):
        self.setup = setup

    def fit(self) -> None:
        """Prepare before the pass over the evaluation images (train, build a control model).

        Most families need nothing beyond the shared forward, hence the empty default.
        """

    @abstractmethod
    def observe(self, forward: SharedForward) -> dict[str, torch.Tensor]:
        """(B, C) image-level column activations per layer this family covers, for one batch."""

    @abstractmethod
    def columns(self, layer: LayerPlan) -> Columns:
        """Parent unit, split flag and name of each of the layer's columns, in `observe`'s order."""

    def accuracy(self, n_images: int) -> dict[str, Any]:
        """Entries this family adds to the result's accuracy record (e.g. a rewritten model's)."""
        return {}

    def layer_info(self, path: str, n_images: int) -> dict[str, Any] | None:
        """This family's per-layer record, stored under `info_key` (e.g. the SAE's training)."""
        return None

    @classmethod
    def accuracy_text(cls, accuracy: dict[str, Any]) -> str:
        """What the table's accuracy line says about this family's `accuracy` entries."""
        return ""

    @classmethod
    def layer_lines(cls, info: dict[str, Any] | None, accuracy: dict[str, Any]) -> list[str]:
        """Lines under a layer's heading in the table, from this family's `info_key` record."""
        return []


class SubunitBaseline(Baseline, ABC):
    """A family whose columns are the plan's sub-units: ELUDe, and the controls that keep its K_j."""

    splits_units = True

    def columns(self, layer: LayerPlan) -> Columns:
        parent = layer.columns()[0].numpy()
        return Columns(parent, (layer.k > 1).numpy()[parent], layer.subunit_names())


@dataclass
class LogitTally:
    """A rewritten model's accuracy and whether its logits equal the original's bit for bit."""

    correct: int = 0
    identical: bool = True
    max_diff: float = 0.0

    def update(self, logits: torch.Tensor, original: torch.Tensor, labels: torch.Tensor) -> None:
        self.identical &= torch.equal(logits, original)
        self.max_diff = max(self.max_diff, float((logits - original).abs().max()))
        self.correct += int((logits.argmax(1) == labels).sum())
