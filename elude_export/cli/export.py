"""`elude export` and `elude validate`."""

from __future__ import annotations

from pathlib import Path

import click

from elude_export.cli.core import load_model_from_options, model_options
from elude_export.errors import ExportError, PlanError, ValidationError

TAPS_HELP = ("Which taps to expose, repeatable: LAYERS[:POOLINGS] with LAYERS 'all', a path or a glob "
             "(blocks.*.mlp) and POOLINGS from max, mean, cls, tokens (default max); e.g. "
             "--taps 'blocks.3.mlp:max,mean'. 'none' exposes none. Only tapped (or steered) layers are rewritten.")


def _load(model, checkpoint, pretrained, img_size, plan_path):
    from elude_export.plan import load_plan

    plan = load_plan(plan_path)
    loaded = load_model_from_options(model, checkpoint, pretrained, img_size)
    if plan.model_name != loaded.name:
        raise PlanError(f"plan {plan_path} was fitted on model '{plan.model_name}', not '{loaded.name}'")
    return loaded, plan


@click.command("export")
@click.argument("model", default="embedded")
@model_options
@click.option("--plan", "plan_path", required=True, type=click.Path(path_type=Path), help="Plan from `elude fit`.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="ONNX file to write (atomically). Default model.onnx unless --triton-repo is given.")
@click.option("--taps", multiple=True, default=("all",), show_default=True, help=TAPS_HELP)
@click.option("--steer", default="tapped", show_default=True,
              help="Layers with a steer.<layer> input: tapped, all, none, or comma-separated globs.")
@click.option("--mode", type=click.Choice(["fused", "explicit"]), default="fused", show_default=True,
              help="fused: fc2(h * steer), bitwise-equal main path; explicit: fc2 over the sub-unit vector.")
@click.option("--router", "router_kind", type=click.Choice(["auto", "dense", "low-rank"]), default="auto",
              show_default=True, help="auto: the plan's low-rank routing factors when it has them.")
@click.option("--opset", type=click.IntRange(17, 23), default=18, show_default=True)
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="auto: torch.onnx dynamo exporter, TorchScript exporter if that fails.")
@click.option("--triton-repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write a Triton model repository here (DIR/<name>/config.pbtxt, DIR/<name>/1/model.onnx).")
@click.option("--triton-backend", type=click.Choice(["onnxruntime", "python"]), default="onnxruntime",
              show_default=True, help="python: a model.py that runs the same .onnx with onnxruntime.")
@click.option("--triton-name", default=None, help="Triton model name (default: elude_<model>).")
@click.option("--max-batch-size", type=click.IntRange(0), default=32, show_default=True)
@click.option("--triton-instance", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True)
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Labels file from `elude label` (same plan): written into the ONNX metadata (elude.labels).")
def export_command(model, checkpoint, pretrained, img_size, plan_path, output, taps, steer, mode, router_kind, opset,
                   exporter, triton_repo, triton_backend, triton_name, max_batch_size, triton_instance, labels_path):
    """Export MODEL rewritten by a plan to ONNX, with named tap outputs and steer inputs."""
    from dataclasses import replace

    from elude_export.export.onnx_export import export_onnx
    from elude_export.export.options import ExportOptions
    from elude_export.export.triton import write_triton_repository

    loaded, plan = _load(model, checkpoint, pretrained, img_size, plan_path)
    if output is None and triton_repo is None:
        output = Path("model.onnx")
    selection = dict(taps=list(taps), steer={"none": False, "tapped": True}.get(steer, steer),
                     labels=_labels(labels_path, plan))
    options = ExportOptions(mode=mode, low_rank=router_kind != "dense", opset=opset, exporter=exporter)
    if router_kind == "low-rank" and all(layer.router_a is None for layer in plan.layers):
        raise ExportError("--router low-rank: this plan has no low-rank factors (fit with --router-rank)")
    if output is not None:
        path = export_onnx(loaded, plan, output, options=options, log=click.echo, **selection)
        _describe(path)
    if triton_repo is not None:
        import tempfile

        name = triton_name or f"elude_{loaded.name}".replace("/", "_")
        # Triton batches every tensor, steers included: its copy carries one steer row per image
        with tempfile.TemporaryDirectory(dir=triton_repo.parent if triton_repo.parent.exists() else None) as tmp:
            staged = export_onnx(loaded, plan, Path(tmp) / "model.onnx",
                                 options=replace(options, steer_layout="per_image"),
                                 log=lambda message: click.echo(message) if message.startswith("note") else None,
                                 **selection)
            folder = write_triton_repository(staged, triton_repo, name, triton_backend, max_batch_size,
                                             triton_instance)
        click.echo(f"wrote Triton model repository {folder} ({triton_backend} backend)")


def _labels(path: Path | None, plan):
    """The labels of `elude label` for this plan (a file of another plan is refused), or None."""
    if path is None:
        return None
    from elude_export.evidence.labels import load_labels

    return load_labels(path, plan.fingerprint()).labels


def _describe(path: Path) -> None:
    from elude_export.export.contract import read_contract

    contract = read_contract(path)
    click.echo(f"  outputs: {', '.join(contract.outputs + [tap.output for tap in contract.taps])}")
    steers = [layer.steer_input for layer in contract.layers if layer.steer_input]
    click.echo(f"  steer inputs (optional, default ones): {', '.join(steers) or 'none'}")
    if contract.labels:
        labelled = sum(label.text != "unlabelled" for label in contract.labels.values())
        click.echo(f"  labels (elude.labels): {len(contract.labels)} columns, {labelled} labelled")


@click.command("validate")
@click.argument("model", default="embedded")
@model_options
@click.option("--plan", "plan_path", required=True, type=click.Path(path_type=Path))
@click.option("--onnx", "onnx_path", required=True, type=click.Path(path_type=Path), help="Exported model.")
@click.option("--data", default="embedded:test", show_default=True,
              help="Held-out images (as for `elude fit --data`), or 'none' for random inputs only.")
@click.option("--limit", "n_images", type=click.IntRange(0), default=64, show_default=True, help="Images to use.")
@click.option("--random", "n_random", type=click.IntRange(0), default=4, show_default=True,
              help="Random inputs added (batches of 1 and n-1: checks the dynamic batch axis).")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="onnxruntime execution provider; auto = CUDA when available. The report names the one that ran.")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default 1e-5 CPU, 1e-4 CUDA).")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default 1e-4 CPU, 1e-3 CUDA).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as JSON.")
@click.option("--no-steering", is_flag=True,
              help="Skip the steering check (otherwise a validation that could not steer fails).")
@click.option("--max-tie-share", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Most of a tap's elements that may be left out as near-tie routes before the tap fails.")
def validate_command(model, checkpoint, pretrained, img_size, plan_path, onnx_path, data, n_images, n_random,
                     batch_size, provider, atol, rtol, report_path, no_steering, max_tie_share):
    """Compare an exported ONNX model under onnxruntime with the PyTorch model, output by output."""
    from elude_export.data.sources import open_source
    from elude_export.export.validate import ValueMismatchError, validate_export

    loaded, plan = _load(model, checkpoint, pretrained, img_size, plan_path)
    if report_path is not None and not report_path.parent.exists():
        raise ValidationError(f"report directory {report_path.parent} does not exist")
    source = None if data == "none" else open_source(data, (loaded.input_spec.height, loaded.input_spec.width))
    report = validate_export(loaded, plan, onnx_path, source, provider, n_images, n_random, batch_size, atol, rtol,
                             check_steering=not no_steering, max_tie_share=max_tie_share)
    for line in report.lines():
        click.echo(line)
    if report_path is not None:
        report.write_json(report_path)
        click.echo(f"report: {report_path}")
    if not report.ok:
        raise ValueMismatchError(f"{onnx_path} differs from the PyTorch model beyond tolerance (see the ✗ lines)")

