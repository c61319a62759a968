"""Validate an export: the PyTorch model vs the `.onnx` under onnxruntime, output by output.

Like Optimum's `validate_model_outputs`, in two steps. First the graph interface
(`interface.check_interface`: exactly the contract's output names, the `batch` / `steer_batch`
dynamic axes, sizes), each failure kind a typed `ValidationError`. Then the values: every
output gets one ✓/✗ line with its max absolute and relative error, the share of
bitwise-equal elements and (classifiers) top-1 agreement; a failed comparison is reported
(and the CLI raises `ValueMismatchError`). Three groups of value checks, on the same
held-out images plus random inputs:
- original outputs (default steers) vs the original PyTorch model: the export is lossless;
- taps vs the PyTorch rewrite (same plan, mode and router as the export);
- steering: one sub-unit's steer set to 0 in both, all outputs compared again.

The PyTorch reference always runs on CPU in fp32. Tolerances (defaults):
- CPU execution provider: atol 1e-5, rtol 1e-4 (MLAS vs PyTorch kernels re-associate sums);
- CUDA execution provider: atol 1e-4, rtol 1e-3, with TF32 switched off in the session
  (`use_tf32=0`): cuBLAS picks its own reduction order and onnxruntime fuses attention and
  GELU into different kernels, so fp32 results differ from the CPU reference by ~1e-5
  relative per layer; with TF32 on (onnxruntime's default) errors reach 1e-3..1e-2.
Tap columns depend on an argmax: where a unit's two best routing scores are within float
error of each other (relative margin below the provider's `TIE_RTOLS`: 1e-4 on CPU, 10x the float
error seen on route scores; 1e-3 on CUDA), another backend may pick the other
sub-unit, moving the unit's whole activation to a sibling column. Such (image, unit) routes
are found from the PyTorch scores, left out of the tap comparison and counted in the report;
any other difference is an error. The original outputs never depend on routing (lossless).
A validation that leaves out more than `max_tie_share` (default 5%) of a tap's elements, or
that could not steer (no candidate sub-unit fired on the inputs), fails: it would otherwise
pass without having checked. The steered sub-unit is chosen from the PyTorch taps of the
validation inputs themselves (the most active split sub-unit away from a tie), not from
calibration statistics; `check_steering=False` (`--no-steering`) skips steering on purpose.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from elude_export.artifacts import json_safe, write_json_atomic
from elude_export.models import model_batches
from elude_export.compare import Comparison, compare
from elude_export.errors import ValidationError
from elude_export.models import LoadedModel, fingerprint_model
from elude_export.export.contract import INPUT_NAME, OnnxContract, read_contract
from elude_export.export.interface import check_interface
from elude_export.export.ort_session import CPU, CUDA, open_session
from elude_export.plan import Plan
from elude_export.rewrite import apply_plan, configure_layer_taps, disentangled_layers, read_taps, set_steers
from elude_export.data.sources import ImageSource
from elude_export.vocabulary import TOKEN_TAP

TOLERANCES = {CPU: (1e-5, 1e-4), CUDA: (1e-4, 1e-3)}
TIE_RTOL = 1e-3  # routing margin, relative to the scores' size, below which a backend may route differently
TIE_RTOLS = {CPU: 1e-4, CUDA: TIE_RTOL}  # per provider: MLAS stays ~1e-6 relative on route scores, CUDA ~1e-4
MAX_TIE_SHARE = 0.05  # more of a tap left out than this and the tap comparison proves too little
STEER_CANDIDATES = 8  # sub-units tried per steered layer, most active first


@dataclass
class ValidationReport:
    """Everything `elude validate` prints and writes."""

    onnx_path: str
    provider: str  # the execution provider that actually ran
    requested_provider: str
    available_providers: list[str]
    data: str
    n_images: int
    n_random: int
    atol: float
    rtol: float
    outputs: list[Comparison] = field(default_factory=list)
    taps: list[Comparison] = field(default_factory=list)
    steering: list[Comparison] = field(default_factory=list)
    steered_subunit: str | None = None
    steer_effect: float = 0.0  # max |steered - unsteered| of the PyTorch output
    steer_tap_effect: float = 0.0  # the same over the taps (a zero-initialised head hides the output's)
    notes: list[str] = field(default_factory=list)
    tie_exclusions: dict[str, int] = field(default_factory=dict)  # tap -> tap elements left out (near-tie routes)
    tie_shares: dict[str, float] = field(default_factory=dict)  # tap -> share of its elements left out
    max_tie_share: float = MAX_TIE_SHARE
    tie_rtol: float = TIE_RTOL
    steering_required: bool = True  # False: the caller skipped steering on purpose (--no-steering)

    @property
    def checks(self) -> list[Comparison]:
        return self.outputs + self.taps + self.steering

    @property
    def too_many_ties(self) -> dict[str, float]:
        """Taps whose left-out share exceeds the bound: their comparison proves too little."""
        return {name: share for name, share in self.tie_shares.items() if share > self.max_tie_share}

    @property
    def steering_missing(self) -> bool:
        return self.steering_required and not self.steering

    @property
    def ok(self) -> bool:
        return (bool(self.checks) and all(c.ok for c in self.checks) and not self.too_many_ties
                and not self.steering_missing)

    def lines(self) -> list[str]:
        out = [f"validate {self.onnx_path} on {self.provider} (requested: {self.requested_provider}); "
               f"{self.n_images} images from {self.data} + {self.n_random} random inputs; "
               f"atol {self.atol:g}, rtol {self.rtol:g}"]
        out += [f"note: {note}" for note in self.notes]
        out.append("outputs (onnxruntime vs original PyTorch):")
        out += ["  " + c.line() for c in self.outputs]
        if self.taps:
            out.append("taps (onnxruntime vs PyTorch rewrite):")
            out += ["  " + c.line() for c in self.taps]
            excluded = {name: n for name, n in self.tie_exclusions.items() if n}
            if excluded:
                out.append(f"  (left out: elements of routes at a near tie, relative margin < {self.tie_rtol:g}: "
                           + ", ".join(f"{name} {n} ({self.tie_shares.get(name, 0.0):.1%})"
                                       for name, n in excluded.items()) + ")")
            for name, share in self.too_many_ties.items():
                out.append(f"  ✗ {name}: {share:.1%} of its elements left out as near ties, above the bound "
                           f"{self.max_tie_share:.1%} (raise it with --max-tie-share if that is acceptable)")
        if self.steering:
            out.append(f"steering ({self.steered_subunit} = 0 in both; it moves the PyTorch output by up to "
                       f"{self.steer_effect:.3e}, the taps by up to {self.steer_tap_effect:.3e}):")
            out += ["  " + c.line() for c in self.steering]
        elif self.steering_missing:
            out.append("✗ steering not checked (no candidate sub-unit fired away from a near tie on these inputs); "
                       "give more or other images, or skip it on purpose with --no-steering")
        failed = sum(not c.ok for c in self.checks) + len(self.too_many_ties) + int(self.steering_missing)
        total = len(self.checks) + len(self.too_many_ties) + int(self.steering_missing)
        out.append("result: OK" if self.ok else f"result: FAILED ({failed} of {total} checks)")
        return out

    def as_dict(self) -> dict[str, Any]:
        return json_safe({
            "ok": self.ok, "onnx": self.onnx_path, "provider": self.provider,
            "requested_provider": self.requested_provider, "available_providers": self.available_providers,
            "data": self.data, "images": self.n_images, "random_inputs": self.n_random,
            "tolerance": {"atol": self.atol, "rtol": self.rtol},
            "outputs": [c.as_dict() for c in self.outputs], "taps": [c.as_dict() for c in self.taps],
            "steering": {"subunit": self.steered_subunit, "effect_max_abs": self.steer_effect,
                         "tap_effect_max_abs": self.steer_tap_effect,
                         "comparisons": [c.as_dict() for c in self.steering]},
            "notes": self.notes, "tie_exclusions": self.tie_exclusions, "tie_rtol": self.tie_rtol,
            "tie_shares": self.tie_shares, "max_tie_share": self.max_tie_share,
            "steering_required": self.steering_required,
        })

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def write_json(self, path: str | Path) -> Path:
        """Atomic, with the usual permissions: a reader never sees half a report."""
        return write_json_atomic(path, self.as_dict(), ValidationError)


class ValueMismatchError(ValidationError):
    """The exported model's values differ from PyTorch beyond tolerance (the report's ✗ lines)."""


def load_checked_contract(onnx_path: str | Path, loaded: LoadedModel, plan: Plan) -> OnnxContract:
    """Check the file (onnx.checker) and that it was exported from this model and plan."""
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise ValidationError(f"ONNX model not found: {path}")
    try:
        onnx.checker.check_model(str(path), full_check=True)
        contract = read_contract(path)
    except (ValueError, onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ValidationError(f"{path} is not a valid ELUDe export: {str(exc).splitlines()[0]}") from exc
    if contract.model_fingerprint != fingerprint_model(loaded.model):
        raise ValidationError(f"{path} was exported from other weights than this {loaded.name} model "
                              f"(export {contract.model_fingerprint[:12]})")
    if contract.plan_fingerprint != plan.fingerprint():
        raise ValidationError(f"{path} was exported with another plan (export plan {contract.plan_fingerprint[:12]}, "
                              f"this plan {plan.fingerprint()[:12]})")
    return contract


def reference_rewrite(loaded: LoadedModel, plan: Plan, contract: OnnxContract) -> torch.nn.Module:
    """The PyTorch rewrite the export was traced from: same layers, mode, router and taps."""
    options = contract.export
    model = apply_plan(loaded.model, plan, mode=options.mode, layers=[layer.path for layer in contract.layers],
                       low_rank=options.low_rank, poolings=())
    kinds: dict[str, list[str]] = {}
    for tap in contract.taps:
        kinds.setdefault(tap.layer, []).append(tap.pooling)
    configure_layer_taps(model, kinds)
    return model


def _pick_steer_target(contract: OnnxContract, taps: dict[str, np.ndarray]) -> list[tuple[str, int]]:
    """Candidate (layer, column) pairs of split sub-units, most active first.

    Activity is read from the PyTorch taps of the validation inputs (largest |tap| over images):
    a sub-unit that fires there moves the output when steered. Layers without a tap fall back to
    the calibration mean.
    """
    candidates = []
    for layer in contract.layers:
        if not layer.steer_input:
            continue
        counts = np.bincount(np.asarray(layer.unit), minlength=layer.n_units)
        split = [c for c, unit in enumerate(layer.unit) if counts[unit] > 1]
        observed = [np.abs(taps[t.output]).reshape(-1, layer.n_subunits).max(0)
                    for t in contract.taps if t.layer == layer.path and t.output in taps]
        baseline = contract.baseline.get(layer.path)
        if observed:
            activity = np.max(observed, axis=0)
            split = [c for c in split if activity[c] > 0]
            split.sort(key=lambda c: -float(activity[c]))
        elif baseline is not None:
            split.sort(key=lambda c: -float(baseline.mean[c]))
        candidates += [(layer.path, c) for c in split[:STEER_CANDIDATES]]
    return candidates


def validate_export(
    loaded: LoadedModel,
    plan: Plan,
    onnx_path: str | Path,
    source: ImageSource | None = None,
    provider: str = "auto",
    n_images: int = 64,
    n_random: int = 4,
    batch_size: int = 16,
    atol: float | None = None,
    rtol: float | None = None,
    check_steering: bool = True,
    seed: int = 0,
    max_tie_share: float = MAX_TIE_SHARE,
) -> ValidationReport:
    """Check the graph interface, then run PyTorch and onnxruntime on the same inputs and compare
    every output, tap and a steer. Interface failures raise (typed); value failures are reported,
    and so are taps with more than `max_tie_share` left out and a steering check that could not run."""
    contract = load_checked_contract(onnx_path, loaded, plan)
    check_interface(onnx_path, contract)
    session = open_session(onnx_path, provider, ValidationError)
    actual = session.get_providers()[0]
    default_atol, default_rtol = TOLERANCES.get(actual, TOLERANCES[CUDA])
    import onnxruntime as ort

    report = ValidationReport(
        onnx_path=str(onnx_path), provider=actual, requested_provider=provider,
        available_providers=ort.get_available_providers(), data=source.name if source is not None else "none",
        n_images=0, n_random=n_random, atol=default_atol if atol is None else atol,
        rtol=default_rtol if rtol is None else rtol, max_tie_share=max_tie_share, steering_required=check_steering,
        tie_rtol=TIE_RTOLS.get(actual, TIE_RTOL),
    )
    if provider == "auto" and actual != CUDA:
        report.notes.append("no CUDA execution provider in this onnxruntime: validated on CPU")

    batches = _inputs(loaded, source, n_images, n_random, batch_size, seed)
    report.n_images = sum(len(b) for b in batches) - n_random
    if not batches:
        raise ValidationError("no inputs to validate on: give images (--data) or random inputs (--random)")
    expected = contract.outputs + [tap.output for tap in contract.taps]

    rewritten = reference_rewrite(loaded, plan, contract)
    classifier = loaded.num_classes > 0
    original, _ = _run_torch(loaded.model, batches, contract.outputs[0])
    rewrite, ties = _run_torch(rewritten, batches, contract.outputs[0], report.tie_rtol)
    onnx_out = _run_onnx(session, batches, expected, {})
    for name in contract.outputs:
        report.outputs.append(compare(name, original[name], onnx_out[name], report.atol, report.rtol, classifier))
    for tap in contract.taps:
        reference, candidate, excluded = _without_ties(tap, contract, ties, rewrite[tap.output], onnx_out[tap.output])
        report.taps.append(compare(tap.output, reference, candidate, report.atol, report.rtol))
        report.tie_exclusions[tap.output] = excluded
        report.tie_shares[tap.output] = excluded / max(1, rewrite[tap.output].size)

    if check_steering:
        _check_steering(report, contract, rewritten, session, batches, expected, rewrite, ties, classifier)
    return report


def route_ties(router, x: torch.Tensor, rtol: float = TIE_RTOL) -> torch.Tensor:
    """(B, H) or (B, N, H): units whose two best routing scores are within `rtol` of each other."""
    lead = router.describe(x).shape[:-1]
    ties = torch.zeros(*lead, router.n_units, dtype=torch.bool)
    if router.n_split == 0 or router.k_max < 2:
        return ties
    scores = router.scores(x).float()
    best = scores.topk(2, dim=-1).values
    finite = torch.isfinite(scores)
    typical = torch.where(finite, scores.abs(), 0).sum((-1, -2)) / finite.sum((-1, -2)).clamp_min(1)
    scale = best.abs().amax(-1) + typical.unsqueeze(-1)
    ties[..., router.split_units.cpu()] = (best[..., 0] - best[..., 1]) <= rtol * scale
    return ties


def _without_ties(tap, contract: OnnxContract, ties: dict[str, np.ndarray], reference: np.ndarray,
                  candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Zero, in both, the tap elements whose unit was routed at a near tie."""
    tie = ties.get(tap.layer)
    if tie is None or reference.shape != candidate.shape:  # a shape mismatch must stay visible
        return reference, candidate, 0
    parent = np.asarray(contract.layer(tap.layer).unit)
    if tap.pooling == TOKEN_TAP:
        mask = tie[..., parent] if tie.ndim == 3 else tie[:, None, parent]
    else:
        mask = (tie.any(1) if tie.ndim == 3 else tie)[:, parent]
    mask = np.broadcast_to(mask, reference.shape)
    return np.where(mask, 0, reference), np.where(mask, 0, candidate), int(mask.sum())


def _check_steering(report: ValidationReport, contract: OnnxContract, rewritten: torch.nn.Module, session,
                    batches: list[torch.Tensor], expected: list[str], rewrite: dict[str, np.ndarray],
                    ties: dict[str, np.ndarray], classifier: bool) -> None:
    """Zero one sub-unit's steer in PyTorch (`set_steers`) and in the graph (its steer input)."""
    from elude_export.rewrite import reset_steers

    # activity away from near ties: a tied route could steer different images in the two backends
    untied = {tap.output: _without_ties(tap, contract, ties, rewrite[tap.output], rewrite[tap.output])[0]
              for tap in contract.taps}
    candidates = _pick_steer_target(contract, untied)
    if not candidates:
        report.notes.append("no split sub-unit with a steer input fired on these inputs: steering not checked")
        return
    layout = contract.export.steer_layout
    main = contract.outputs[0]
    unsteered = rewrite[main]
    for path, column in candidates:
        info = contract.layer(path)
        unit = info.unit[column]
        if path in ties and ties[path][..., unit].any():
            continue  # a near-tie route of this unit would make the backends steer different images
        name = info.subunits[column]
        set_steers(rewritten, {name: 0.0})
        try:
            steered, steered_ties = _run_torch(rewritten, batches, main, report.tie_rtol)
        finally:
            reset_steers(rewritten)
        effect = float(np.abs(steered[main] - unsteered).max())
        tap_effect = max((float(np.abs(steered[t.output] - rewrite[t.output]).max()) for t in contract.taps),
                         default=0.0)
        if effect == 0.0 and tap_effect == 0.0:
            continue  # never routed to on these inputs: try the next candidate
        steer = np.ones(info.n_subunits, dtype=np.float32)
        steer[column] = 0.0
        feed = {info.steer_input: steer if layout == "shared" else steer[None]}
        onnx_out = _run_onnx(session, batches, expected, feed)
        report.steered_subunit, report.steer_effect, report.steer_tap_effect = name, effect, tap_effect
        taps = {tap.output: tap for tap in contract.taps}
        for output in expected:
            reference, candidate = steered[output], onnx_out[output]
            if output in taps:
                reference, candidate, _ = _without_ties(taps[output], contract, steered_ties, reference, candidate)
            report.steering.append(compare(f"steered {output}", reference, candidate, report.atol, report.rtol,
                                           classifier and output == main))
        return
    report.notes.append("setting no candidate sub-unit to 0 changed the output or a tap on these inputs: "
                        "steering not checked")


def _inputs(loaded: LoadedModel, source: ImageSource | None, n_images: int, n_random: int, batch_size: int,
            seed: int) -> list[torch.Tensor]:
    """Image batches, then random batches of 1 and n_random - 1 (exercises the dynamic batch axis)."""
    spec = loaded.input_spec
    batches = []
    if source is not None and n_images > 0:
        batches = [batch for _, batch in model_batches(source, spec, batch_size, torch.device("cpu"),
                                                       torch.float32, n_images)]
    generator = torch.Generator().manual_seed(seed)
    for size in [s for s in (1, n_random - 1) if s > 0]:
        batches.append(torch.randn(size, spec.channels, spec.height, spec.width, generator=generator))
    return batches


@torch.no_grad()
def _run_torch(model: torch.nn.Module, batches: list[torch.Tensor], main: str,
               tie_rtol: float = TIE_RTOL) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The fp32 CPU reference: (outputs and taps, near-tie routes per rewritten layer).

    The caller's model is not moved: a copy runs when it lives on another device.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()
    model.eval()
    collected: dict[str, list[np.ndarray]] = {}
    ties: dict[str, list[np.ndarray]] = {}
    # on the router itself: it sees the routing input (a feature map, or a submodule's input)
    hooks = [layer.router.register_forward_pre_hook(
                 lambda router, args, path=path: ties.setdefault(path, []).append(route_ties(router, args[0], tie_rtol).numpy()))
             for path, layer in disentangled_layers(model).items()]
    try:
        for batch in batches:
            collected.setdefault(main, []).append(model(batch).float().numpy())
            for name, value in read_taps(model).items():
                collected.setdefault(name, []).append(value.float().numpy())
    finally:
        for hook in hooks:
            hook.remove()
    return ({name: np.concatenate(values) for name, values in collected.items()},
            {path: np.concatenate(values) for path, values in ties.items()})


def _run_onnx(session, batches: list[torch.Tensor], names: list[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in batches:
        values = session.run(names, {INPUT_NAME: batch.numpy(), **feed})
        for name, value in zip(names, values):
            collected[name].append(value)
    return {name: np.concatenate(values) for name, values in collected.items()}
