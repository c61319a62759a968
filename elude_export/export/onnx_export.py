"""Export a rewritten model to ONNX: named feature taps, steering inputs, the metadata contract.

The graph keeps the original model's interface (`input` -> `logits` / `embedding`) and adds
- `tap.<layer>.<pooling>` outputs, only for the taps asked for (only those layers are rewritten);
- `steer.<layer>` inputs that are also initializers holding ones: onnxruntime uses the ones
  when the caller feeds nothing, so the default graph computes exactly the original outputs;
- `metadata_props` per `onnx_contract`, so a consumer holding only the file can name every
  tap column and read the monitoring baseline.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript, the maintained
path), falling back to the TorchScript exporter under `exporter="auto"` when torch.export
fails. Opset 18: the lowest opset the dynamo exporter targets, run by onnxruntime >= 1.14 and
by Triton's onnxruntime backend since 23.x; onnxruntime fuses the erf-based GELU into its own
kernel, so a newer opset (20 has a Gelu op) buys no speed. How the graph is built (mode,
router, steer layout, opset, exporter) is one `ExportOptions`, recorded in `elude.export`.
Tracing happens in a scratch folder; the checked file is moved into place atomically with the
usual permissions (`artifacts.write_file_atomic`), so another user (a Triton server) can read
it. Models over 2 GB keep their weights in `<name>.data` next to the graph.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import tempfile
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from elude_export.artifacts import check_output_path, write_file_atomic
from elude_export.errors import EludeError, ExportError
from elude_export.models import LoadedModel
from elude_export.export.contract import (BATCH_DIM, INPUT_NAME, STEER_BATCH_DIM, LayerBaseline, LayerInfo,
                                         OnnxContract, SubunitLabel, TapInfo, labels_for_layers)
from elude_export.export.options import ExportOptions
from elude_export.plan import STAT_NAMES, Plan
from elude_export.rewrite import apply_plan, configure_layer_taps, disentangled_layers
from elude_export.vocabulary import IMAGE_POOLING, TAP_KINDS, steer_input_name, tap_output_name

if TYPE_CHECKING:
    import onnx

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf refuses files over 2 GiB; leave room for the graph
PRODUCER = "elude-export"


def output_name(loaded: LoadedModel) -> str:
    """Original output name: the model's own (Hugging Face), else `logits` for classifiers, `embedding` otherwise."""
    return loaded.output_name or ("logits" if loaded.num_classes > 0 else "embedding")


def parse_taps(specs: str | Iterable[str] | None, plan: Plan) -> dict[str, tuple[str, ...]]:
    """Tap specs -> {layer path: kinds}, in plan layer order.

    A spec is `LAYERS[:KINDS]`: LAYERS is `all`, a path or a glob (`blocks.*.mlp`), several
    separated by `,` when no kinds follow; KINDS are `max`, `mean`, `cls`, `tokens`
    (comma-separated, default `max`). `;` separates specs in one string; `none` asks for none.
    """
    if specs is None:
        specs = ["all"]
    elif isinstance(specs, str):
        specs = [specs]
    paths = [layer.path for layer in plan.layers]
    chosen: dict[str, list[str]] = {}
    for spec in (part.strip() for value in specs for part in value.split(";")):
        if not spec or spec == "none":
            continue
        layer_part, _, kind_part = spec.partition(":")
        kinds = [k.strip() for k in kind_part.split(",") if k.strip()] if kind_part else [IMAGE_POOLING]
        unknown = [k for k in kinds if k not in TAP_KINDS]
        if unknown:
            raise ExportError(f"unknown tap pooling {unknown[0]!r} in '{spec}' (use {', '.join(TAP_KINDS)})")
        for pattern in (p.strip() for p in layer_part.split(",") if p.strip()):
            matched = paths if pattern == "all" else [p for p in paths if fnmatch.fnmatchcase(p, pattern)]
            if not matched:
                raise ExportError(f"unknown tap layer '{pattern}': the plan's layers are {', '.join(paths)}")
            for path in matched:
                chosen.setdefault(path, [])
                chosen[path] += [k for k in kinds if k not in chosen[path]]
    return {path: tuple(chosen[path]) for path in paths if path in chosen}


def parse_steer(steer: bool | str | Iterable[str], plan: Plan, tapped: Iterable[str]) -> list[str]:
    """Which layers get a steer input: True/`tapped` (the tapped layers), False/`none`, `all`, or globs."""
    paths = [layer.path for layer in plan.layers]
    if steer is True or steer == "tapped":
        wanted = set(tapped)
    elif steer is False or steer == "none":
        wanted = set()
    elif steer == "all":
        wanted = set(paths)
    else:
        patterns = [p.strip() for value in ([steer] if isinstance(steer, str) else steer) for p in value.split(",")]
        wanted = set()
        for pattern in (p for p in patterns if p):
            matched = [p for p in paths if fnmatch.fnmatchcase(p, pattern)]
            if not matched:
                raise ExportError(f"unknown steer layer '{pattern}': the plan's layers are {', '.join(paths)}")
            wanted.update(matched)
    return [p for p in paths if p in wanted]


class ExportGraph(nn.Module):
    """What the exporter traces: rewritten model, steers in, original output plus taps out."""

    def __init__(self, model: nn.Module, taps: list[TapInfo], steer_layers: list[str]):
        super().__init__()
        self.model = model
        self.tap_list = [(tap.layer, tap.pooling) for tap in taps]
        self.steer_layers = list(steer_layers)

    def forward(self, input: torch.Tensor, steers: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        layers = disentangled_layers(self.model)
        for path, steer in zip(self.steer_layers, steers):
            layers[path].consumer.steer_override = steer
        try:
            output = self.model(input)
            return (output, *[layers[path].taps[pooling] for path, pooling in self.tap_list])
        finally:
            for path in self.steer_layers:
                layers[path].consumer.steer_override = None


class ReferenceGraph(nn.Module):
    """The unmodified model behind the same exporter: the baseline graph benchmarks compare to."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input: torch.Tensor, steers: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return (self.model(input),)


def build_export_graph(loaded: LoadedModel, plan: Plan, taps: Mapping[str, Sequence[str]],
                       steer_layers: Sequence[str], options: ExportOptions) -> tuple[ExportGraph, list[TapInfo]]:
    """Rewrite only the layers that are tapped or steered, and select exactly the taps exported."""
    rewritten_paths = [layer.path for layer in plan.layers if layer.path in taps or layer.path in steer_layers]
    if not rewritten_paths:
        raise ExportError("nothing to export: no taps and no steer inputs were asked for (see --taps / --steer)")
    model = apply_plan(loaded.model, plan, mode=options.mode, layers=rewritten_paths, low_rank=options.low_rank,
                       poolings=())
    configure_layer_taps(model, {path: kinds for path, kinds in taps.items()})
    tap_infos = [TapInfo(tap_output_name(path, kind), path, kind) for path, kinds in taps.items() for kind in kinds]
    return ExportGraph(model, tap_infos, list(steer_layers)).eval(), tap_infos


def build_contract(loaded: LoadedModel, plan: Plan, taps: list[TapInfo], rewritten: Sequence[str],
                   steer_layers: Sequence[str], versions: dict, export: ExportOptions) -> OnnxContract:
    """The metadata a consumer of the file alone needs: names of every column, baselines."""
    layers, baseline = [], {}
    for layer in plan.layers:
        if layer.path not in rewritten:
            continue
        parent, sub = layer.columns()
        layers.append(LayerInfo(
            path=layer.path, n_units=layer.n_units, n_subunits=layer.n_subunits,
            steer_input=steer_input_name(layer.path) if layer.path in steer_layers else "",
            subunits=layer.subunit_names(), unit=parent.tolist(), sub=sub.tolist(),
        ))
        if all(name in layer.stats for name in STAT_NAMES):
            baseline[layer.path] = LayerBaseline(**{name: layer.stats[name].float().numpy() for name in STAT_NAMES})
    spec = asdict(loaded.input_spec)
    return OnnxContract(
        model_name=plan.model_name, model_fingerprint=plan.model_fingerprint, plan_fingerprint=plan.fingerprint(),
        input={**spec, "mean": list(spec["mean"]), "std": list(spec["std"])}, outputs=[output_name(loaded)],
        router=plan.router, layers=layers, taps=taps, quantile_levels=list(plan.quantile_levels), baseline=baseline,
        versions=versions, export=export,
    )


def export_onnx(
    loaded: LoadedModel,
    plan: Plan,
    path: str | Path,
    taps: str | Iterable[str] | Mapping[str, Sequence[str]] | None = "all",
    steer: bool | str | Iterable[str] = True,
    options: ExportOptions | None = None,
    external_data: bool | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    labels: Mapping[str, SubunitLabel] | None = None,
) -> Path:
    """Export `loaded` rewritten by `plan` to `path` (atomically) and return the path.

    taps: tap specs (see `parse_taps`) or a ready {layer: kinds} mapping; steer: which layers
    get a `steer.<layer>` input (see `parse_steer`); options: mode, router, steer layout, opset,
    exporter (defaults: `ExportOptions()`); external_data: None decides by size (> 1.8 GB).
    """
    path, options = Path(path), options or ExportOptions()
    check_output_path(path, ExportError, "model.onnx")
    tap_map = dict(taps) if isinstance(taps, Mapping) else parse_taps(taps, plan)
    if isinstance(taps, Mapping):
        unknown = set(tap_map) - {layer.path for layer in plan.layers}
        if unknown:
            raise ExportError(f"unknown tap layer(s) {sorted(unknown)}: not in the plan")
    steer_layers = parse_steer(steer, plan, tap_map)
    graph, tap_infos = build_export_graph(loaded, plan, tap_map, steer_layers, options)
    rewritten = list(disentangled_layers(graph.model))
    steer_sizes = {p: plan.layer(p).n_subunits for p in steer_layers}
    with _scratch(path) as work:
        proto, used = _trace_model(graph, loaded, work, [t.output for t in tap_infos], steer_sizes, options, log)
        # record what was used: the exporter that ran, low-rank routing only where the plan has factors
        recorded = replace(options, exporter=used,
                           low_rank=options.low_rank and any(plan.layer(p).router_a is not None for p in rewritten))
        contract = build_contract(loaded, plan, tap_infos, rewritten, steer_layers, _versions(options.opset, used),
                                  recorded)
        contract.labels = labels_for_layers(dict(labels or {}), rewritten)  # from `elude label`, checked by the caller
        _finalize(proto, contract, steer_sizes, options.steer_layout)
        external = _write_model(proto, path, work, external_data)
    log(_written(path, used, options.opset, external))
    return path


def export_reference_onnx(loaded: LoadedModel, path: str | Path, options: ExportOptions | None = None,
                          log: Callable[[str], None] = lambda _msg: None) -> Path:
    """The original model through the same exporter (no taps, no steers, no contract).

    Only `options.opset` and `options.exporter` apply: the graph is not rewritten.
    """
    path, options = Path(path), options or ExportOptions()
    check_output_path(path, ExportError, "original.onnx")
    with _scratch(path) as work:
        proto, used = _trace_model(ReferenceGraph(loaded.model.eval()), loaded, work, [], {}, options, log)
        _rename_batch_dims(proto, {})
        proto.producer_name = PRODUCER
        external = _write_model(proto, path, work, None)
    log(_written(path, used, options.opset, external))
    return path


@contextlib.contextmanager
def _scratch(path: Path) -> Iterator[Path]:
    """A temporary folder next to `path` for the exporter's own files; always removed."""
    try:
        folder = tempfile.TemporaryDirectory(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent,
                                             ignore_cleanup_errors=True)
    except OSError as exc:
        raise ExportError(f"cannot write to {path.parent}: {exc.strerror}") from exc
    with folder as work:
        try:
            yield Path(work)
        except OSError as exc:
            raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _trace_model(graph: nn.Module, loaded: LoadedModel, work: Path, tap_names: list[str],
                 steer_sizes: dict[str, int], options: ExportOptions,
                 log: Callable[[str], None]) -> tuple[onnx.ModelProto, str]:
    """Trace `graph` into `work` and load it back whole: (onnx.ModelProto, the exporter that ran)."""
    import onnx

    spec = loaded.input_spec
    example = torch.randn(2, spec.channels, spec.height, spec.width)
    per_image = options.steer_layout == "per_image"
    steers = [torch.ones(2, size) if per_image else torch.ones(size) for size in steer_sizes.values()]
    input_names = [INPUT_NAME, *[steer_input_name(p) for p in steer_sizes]]
    output_names = [output_name(loaded), *tap_names]
    raw = work / "raw.onnx"
    used = _trace(graph, (example, steers), raw, input_names, output_names, options, log)
    return onnx.load(str(raw), load_external_data=True), used


def _write_model(proto: onnx.ModelProto, path: Path, work: Path, external_data: bool | None) -> bool:
    """Save `proto` in `work`, check it, move it (weights file first) into place with the usual mode.

    `proto` is cleared once saved: a > 2 GB model must not stay in memory while the checker
    reads the file again. Returns whether the weights went to `<name>.data`.
    """
    import onnx

    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = size > EXTERNAL_DATA_BYTES if external_data is None else external_data
    staged, data_name = work / path.name, f"{path.name}.data"
    onnx.save_model(proto, str(staged), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    proto.Clear()
    _check(staged)
    if external:
        write_file_atomic(path.with_name(data_name), lambda temp: os.replace(work / data_name, temp), ExportError)
    write_file_atomic(path, lambda temp: os.replace(staged, temp), ExportError)
    return external


def _written(path: Path, exporter: str, opset: int, external: bool) -> str:
    return f"wrote {path} ({exporter} exporter, opset {opset}{f', external data {path.name}.data' if external else ''})"


def _trace(graph: nn.Module, args: tuple, target: Path, input_names: list[str], output_names: list[str],
           options: ExportOptions, log: Callable[[str], None]) -> str:
    """Run the exporter; returns which one produced `target`."""
    if options.exporter in ("auto", "dynamo"):
        try:
            _run_dynamo(graph, args, target, input_names, output_names, options)
            return "dynamo"
        except EludeError:
            raise
        except Exception as exc:  # any exporter failure: torch.export is strict about Python control flow
            reason = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if options.exporter == "dynamo":
                raise ExportError(f"the dynamo ONNX exporter failed: {reason}") from exc
            log(f"note: the dynamo exporter failed ({reason}); falling back to the TorchScript exporter")
    try:
        _run_torchscript(graph, args, target, input_names, output_names, options)
    except EludeError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {exc.__class__.__name__}: {exc}") from exc
    return "torchscript"


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warn about harmless tracing details; keep the CLI readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _run_dynamo(graph: nn.Module, args: tuple, target: Path, input_names: list[str], output_names: list[str],
                options: ExportOptions) -> None:
    batch = torch.export.Dim(BATCH_DIM)
    # per-image steers are traced with the image batch and renamed to their own axis afterwards: the
    # graph only broadcasts them, so a (1, S) default serves any batch
    steer_shapes = [None if options.steer_layout == "shared" else {0: batch} for _ in args[1]]
    with _quiet():
        program = torch.onnx.export(graph, args, None, dynamo=True, input_names=input_names,
                                    output_names=output_names, opset_version=options.opset,
                                    dynamic_shapes=({0: batch}, steer_shapes), external_data=True)
        program.save(str(target), external_data=True)


def _run_torchscript(graph: nn.Module, args: tuple, target: Path, input_names: list[str],
                     output_names: list[str], options: ExportOptions) -> None:
    if options.steer_layout == "per_image":
        # its traced graph ties steer rows to the image batch (onnxruntime then fails on a (1, S) steer)
        raise ExportError("per-image steer inputs need the dynamo exporter (use --exporter dynamo)")
    axes = {name: {0: BATCH_DIM} for name in [input_names[0], *output_names]}
    with _quiet(), torch.no_grad():
        torch.onnx.export(graph, args, str(target), dynamo=False, input_names=input_names,
                          output_names=output_names, opset_version=options.opset, dynamic_axes=axes)


def _rename_batch_dims(proto, steer_sizes: dict[str, int], steer_layout: str = "shared") -> None:
    """Name the exporter's symbolic batch axis `batch` everywhere (and per-image steers' `steer_batch`)."""
    graph = proto.graph
    first = graph.input[0].type.tensor_type.shape.dim[0]
    symbol = first.dim_param
    steer_names = {steer_input_name(p) for p in steer_sizes}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        if value.name in steer_names:
            if steer_layout == "per_image" and dims:
                dims[0].ClearField("dim_value")
                dims[0].dim_param = STEER_BATCH_DIM
            continue
        for dim in dims:
            if symbol and dim.dim_param == symbol:
                dim.dim_param = BATCH_DIM
    if steer_layout == "per_image":
        # intermediate shapes were traced with steer rows == images; a (1, S) default breaks that
        # equality, so drop the recorded intermediate shapes and let onnxruntime infer them
        del graph.value_info[:]


def _finalize(proto, contract: OnnxContract, steer_sizes: dict[str, int], steer_layout: str) -> None:
    """Batch axis names, default steers (initializer + input: overridable ones), metadata."""
    import onnx
    from onnx import numpy_helper

    _rename_batch_dims(proto, steer_sizes, steer_layout)
    existing = {init.name for init in proto.graph.initializer}
    for layer, size in steer_sizes.items():
        name = steer_input_name(layer)
        if name in existing:
            continue
        shape = (size,) if steer_layout == "shared" else (1, size)
        proto.graph.initializer.append(numpy_helper.from_array(np.ones(shape, dtype=np.float32), name))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, contract.to_metadata_props())
    proto.producer_name = PRODUCER
    proto.doc_string = (f"ELUDe disentangled {contract.model_name}: taps "
                        f"{', '.join(t.output for t in contract.taps) or 'none'}; steer inputs default to ones")


def _check(model_path: Path) -> None:
    """onnx.checker with strict shape inference, on the path (works past 2 GB)."""
    import onnx

    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"exported graph failed onnx.checker: {str(exc).splitlines()[0]}") from exc


def _versions(opset: int, exporter: str) -> dict:
    import onnx
    import timm

    from elude_export import __version__

    return {"elude": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "onnx": onnx.__version__, "opset": opset, "exporter": exporter}
