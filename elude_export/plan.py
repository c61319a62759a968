"""The Plan: everything fitted, in one safetensors file whose header carries a JSON manifest.

One file keeps the write atomic (temp file + rename) and the contract simple: tensors per
layer (`<path>.k`, `.split_units`, `.router`, `.router_valid`, `.centroids`, optional
`.router_a`/`.router_b`, and `.stat.*` monitoring baselines) plus a manifest with the schema
version, layer list, sub-unit names, fit settings and the fingerprint of the model weights.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from elude_export.artifacts import check_output_path, write_file_atomic
from elude_export.errors import PlanError
from elude_export.models.spec import InputSpec
from elude_export.vocabulary import subunit_name

SCHEMA_VERSION = 2  # 2: the routing context is chosen per layer (1: one for the whole plan)
READABLE_SCHEMAS = (1, 2)
FORMAT_NAME = "elude-plan"
STAT_NAMES = ("threshold", "fire_rate", "mean", "quantiles", "bin_fraction")


@dataclass
class LayerPlan:
    """Routers and statistics of one neuron layer."""

    path: str
    kind: str
    k: torch.Tensor  # (H,) int64 sub-units per unit
    split_units: torch.Tensor  # (Hs,) int64 units with K > 1
    router: torch.Tensor  # (Hs, Kmax, d): rows mu_jk * w1_j, zero where k >= K_j
    centroids: torch.Tensor  # (Hs, Kmax, d) centroids in profile space, for inspection
    router_a: torch.Tensor | None = None  # (Hs*Kmax, r) optional low-rank factors of router
    router_b: torch.Tensor | None = None  # (r, d)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    context_token: str = "mean"  # what this layer's context router reads: "cls" or "mean" (CONTEXT_TOKENS)

    @property
    def n_units(self) -> int:
        return int(self.k.numel())

    @property
    def n_subunits(self) -> int:
        return int(self.k.sum())

    @property
    def d_in(self) -> int:
        return int(self.router.shape[-1])

    @property
    def k_max(self) -> int:
        return int(self.router.shape[1]) if self.router.numel() else 1

    @property
    def router_valid(self) -> torch.Tensor:
        """(Hs, Kmax) which routing rows are real sub-units."""
        ks = self.k[self.split_units]
        return torch.arange(self.k_max)[None, :] < ks[:, None]

    def unit_offsets(self) -> torch.Tensor:
        """(H,) column of each unit's first sub-unit in the unit-major sub-unit order."""
        return torch.cumsum(self.k, 0) - self.k

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(parent unit, sub index) of every sub-unit column, unit-major."""
        parent = torch.repeat_interleave(torch.arange(self.n_units), self.k)
        sub = torch.arange(self.n_subunits) - self.unit_offsets()[parent]
        return parent, sub

    def subunit_names(self) -> list[str]:
        parent, sub = self.columns()
        return [subunit_name(self.path, u, s, self.n_units) for u, s in zip(parent.tolist(), sub.tolist())]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            f"{self.path}.k": self.k,
            f"{self.path}.split_units": self.split_units,
            f"{self.path}.router": self.router,
            f"{self.path}.centroids": self.centroids,
        }
        if self.router_a is not None and self.router_b is not None:
            out[f"{self.path}.router_a"] = self.router_a
            out[f"{self.path}.router_b"] = self.router_b
        out.update({f"{self.path}.stat.{name}": value for name, value in self.stats.items()})
        return out


@dataclass
class Plan:
    """All layers' routers plus what they were fitted on and how."""

    layers: list[LayerPlan]
    model_name: str
    model_fingerprint: str
    input_spec: InputSpec
    router: str  # "context" or "token"
    fit_config: dict[str, Any] = field(default_factory=dict)
    quantile_levels: tuple[float, ...] = ()
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def layer(self, path: str) -> LayerPlan:
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise PlanError(f"plan has no layer '{path}' (layers: {', '.join(l.path for l in self.layers)})")

    @property
    def n_subunits(self) -> int:
        return sum(layer.n_subunits for layer in self.layers)

    def manifest(self) -> dict[str, Any]:
        from elude_export import __version__

        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "tool_version": __version__,
            "created": self.created,
            "model": {"name": self.model_name, "fingerprint": self.model_fingerprint,
                      "input": json.loads(self.input_spec.to_json())},
            "router": self.router,
            "fit": self.fit_config,
            "quantile_levels": list(self.quantile_levels),
            "layers": [
                {"path": l.path, "kind": l.kind, "n_units": l.n_units, "n_subunits": l.n_subunits,
                 "n_split": int(l.split_units.numel()), "k_max": l.k_max, "d_in": l.d_in,
                 "low_rank": None if l.router_b is None else int(l.router_b.shape[0]),
                 "context_token": l.context_token,
                 "subunits": l.subunit_names()}
                for l in self.layers
            ],
        }

    def fingerprint(self, schema_version: int = SCHEMA_VERSION) -> str:
        """sha256 of the plan's tensors and settings: names the plan an export was built from."""
        digest = hashlib.sha256()
        for layer in self.layers:
            for key, tensor in sorted(layer.tensors().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        settings = {"fit": self.fit_config, "model": self.model_fingerprint, "router": self.router}
        if schema_version >= 2:
            settings["context_tokens"] = [layer.context_token for layer in self.layers]
        digest.update(json.dumps(settings, sort_keys=True).encode())
        return digest.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash leaves either the old file or the complete new one."""
        from safetensors.torch import save_file

        path = Path(path)
        check_output_path(path, PlanError, "plan.safetensors")
        tensors: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            tensors.update({k: v.detach().cpu().contiguous() for k, v in layer.tensors().items()})
        metadata = {"manifest": json.dumps(self.manifest()), "fingerprint": self.fingerprint()}
        write_file_atomic(path, lambda temp: save_file(tensors, str(temp), metadata=metadata), PlanError)
        return path


def _read_manifest(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise PlanError(f"{path} is not a readable plan file (truncated or not safetensors): {exc}") from exc
    if "manifest" not in metadata:
        raise PlanError(f"{path} is a safetensors file but not an ELUDe plan (no manifest)")
    try:
        manifest = json.loads(metadata["manifest"])
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: plan manifest is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise PlanError(f"{path}: not an ELUDe plan (format {manifest.get('format')!r})")
    version = manifest.get("schema_version")
    if version not in READABLE_SCHEMAS:
        raise PlanError(f"{path}: plan schema version {version!r} is not supported (this tool reads "
                        f"{', '.join(map(str, READABLE_SCHEMAS))}); refit the plan with this version")
    return manifest, metadata


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The JSON manifest alone, without loading tensors (for `elude inspect` and servers)."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan not found: {path}")
    return _read_manifest(path)[0]


def load_plan(path: str | Path) -> Plan:
    """Load and verify a plan: schema, completeness and the stored fingerprint."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan not found: {path}")
    manifest, metadata = _read_manifest(path)
    version = int(manifest["schema_version"])
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise PlanError(f"{path}: cannot read plan tensors (truncated or corrupt file): {exc}") from exc
    layers = []
    for entry in manifest["layers"]:
        prefix = entry["path"]
        try:
            layer = LayerPlan(
                path=prefix, kind=entry["kind"], k=tensors[f"{prefix}.k"],
                split_units=tensors[f"{prefix}.split_units"], router=tensors[f"{prefix}.router"],
                centroids=tensors[f"{prefix}.centroids"], router_a=tensors.get(f"{prefix}.router_a"),
                router_b=tensors.get(f"{prefix}.router_b"),
                stats={n: tensors[f"{prefix}.stat.{n}"] for n in STAT_NAMES if f"{prefix}.stat.{n}" in tensors},
                # schema 1 plans chose one context for all layers
                context_token=entry["context_token"] if version >= 2 else manifest["context_token"],
            )
        except KeyError as exc:
            raise PlanError(f"{path}: plan is missing tensor {exc} for layer {prefix}") from exc
        if layer.n_subunits != entry["n_subunits"]:
            raise PlanError(f"{path}: layer {prefix} has {layer.n_subunits} sub-units, manifest says {entry['n_subunits']}")
        layers.append(layer)
    model = manifest["model"]
    plan = Plan(
        layers=layers, model_name=model["name"], model_fingerprint=model["fingerprint"],
        input_spec=InputSpec.from_json(json.dumps(model["input"])), router=manifest["router"],
        fit_config=manifest.get("fit", {}),
        quantile_levels=tuple(manifest.get("quantile_levels", ())), created=manifest.get("created", ""),
    )
    if metadata.get("fingerprint") != plan.fingerprint(version):
        raise PlanError(f"{path}: plan contents do not match their fingerprint (file modified or corrupt)")
    return plan
