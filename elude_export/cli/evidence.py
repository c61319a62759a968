"""`elude evaluate`, `elude report`, `elude steer`, `elude label`: the evidence that sub-units are worth having."""

from __future__ import annotations

from pathlib import Path

import click

from elude_export.cli.core import load_model_from_options, model_options, split_patterns
from elude_export.artifacts import write_json_atomic
from elude_export.errors import DataError

DEVICE = click.Choice(["auto", "cpu", "cuda"])


def _load(plan_path: Path, model: str | None, checkpoint, pretrained, img_size):
    """The plan and the model it was fitted on (by default the plan's own model name)."""
    from elude_export.plan import load_plan

    plan = load_plan(plan_path)
    loaded = load_model_from_options(model or plan.model_name, checkpoint, pretrained, img_size)
    return plan, loaded


def _source(spec: str, loaded, what: str):
    from elude_export.data.sources import open_source

    source = open_source(spec, (loaded.input_spec.height, loaded.input_spec.width))
    if source.labels is None:
        raise DataError(f"{what} data {spec} has no labels; evaluation needs a labelled set (e.g. embedded:test)")
    return source


def evaluation_options(command):
    """Options shared by `evaluate` and `report`."""
    for decorator in reversed([
        click.option("--plan", "plan_path", required=True, type=click.Path(path_type=Path),
                     help="Plan file (from `elude fit`)."),
        click.option("--model", default=None, help="Model the plan was fitted on (default: the plan's model name)."),
        click.option("--data", default="embedded:test", show_default=True,
                     help="Labelled evaluation images NOT used for fitting: embedded:test, digits:test, "
                          ".npz with labels, or a class-per-folder image tree."),
        click.option("--layers", "layer_patterns", multiple=True,
                     help="Evaluate only these plan layers (exact paths)."),
        click.option("--top-n", type=click.IntRange(2), default=20, show_default=True,
                     help="Top-activating images per unit / sub-unit."),
        click.option("--limit", type=click.IntRange(1), default=None, help="Use at most this many evaluation images."),
        click.option("--sae/--no-sae", default=True, show_default=True,
                     help="Train the TopK sparse-autoencoder baseline (one per layer, as many latents as sub-units)."),
        click.option("--sae-data", default=None,
                     help="The plan's fit data, on which the SAE trains and the global control clusters (default: "
                          "embedded:calib for embedded:test, digits:train for digits:test)."),
        click.option("--sae-k", type=click.IntRange(1), default=32, show_default=True,
                     help="Active SAE latents per token."),
        click.option("--sae-steps", type=click.IntRange(1), default=2000, show_default=True,
                     help="SAE training steps."),
        click.option("--bootstrap", type=click.IntRange(10), default=1000, show_default=True,
                     help="Bootstrap resamples for the confidence intervals."),
        click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True),
        click.option("--device", type=DEVICE, default="auto", show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Also write every number as JSON."),
    ]):
        command = decorator(command)
    return model_options(command)


def _evaluate(plan_path, model, checkpoint, pretrained, img_size, data, layer_patterns, top_n, limit, sae, sae_data,
              sae_k, sae_steps, bootstrap, batch_size, device, seed, json_out):
    from elude_export.models import resolve_device
    from elude_export.evidence.evaluate import EvalConfig, check_layers, default_fit_data, evaluate
    from elude_export.evidence.results import write_json

    if json_out is not None and not json_out.parent.exists():
        raise DataError(f"output directory {json_out.parent} does not exist")
    plan, loaded = _load(plan_path, model, checkpoint, pretrained, img_size)
    layers = split_patterns(layer_patterns)
    check_layers(plan, layers)
    source = _source(data, loaded, "evaluation")
    fit_source = None  # trains the SAE and clusters the global control; never the evaluation images
    fit_data = sae_data or default_fit_data(data)
    if sae and fit_data is None:
        raise DataError(f"cannot tell which images the plan was fitted on for --data {data}: pass --sae-data "
                        "(the fit data) or --no-sae")
    if fit_data is not None:
        from elude_export.data.sources import open_source

        fit_source = open_source(fit_data, (loaded.input_spec.height, loaded.input_spec.width))
    config = EvalConfig(top_n=top_n, layers=layers, batch_size=batch_size, limit=limit, bootstrap=bootstrap, seed=seed,
                        sae=sae, sae_k=sae_k, sae_steps=sae_steps)
    target = resolve_device(device)
    result = evaluate(loaded, plan, source, config, fit_source, target, log=lambda m: click.echo(m, err=True))
    if json_out is not None:
        write_json(result, str(json_out))
    return plan, loaded, source, result, target


@click.command("evaluate")
@evaluation_options
@click.option("--split-only", is_flag=True, help="Print only units that were split (and their sub-units).")
def evaluate_command(split_only, **options):
    """Score units vs ELUDe sub-units vs a random split vs a sparse autoencoder on held-out labelled images.

    Prints per layer: label purity, concept purity (where the data has ground-truth concepts),
    activation-weighted embedding coherence and label entropy of each column's top-n images,
    as means with 95% bootstrap intervals and paired differences to the units; and the
    accuracy of the original and the rewritten model (identical by construction).
    """
    _plan, _loaded, _source_, result, _device = _evaluate(**options)
    click.echo(result.table(split_only=split_only))
    if options["json_out"] is not None:
        click.echo(f"wrote {options['json_out']}")


@click.command("report")
@evaluation_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"),
              show_default=True, help="HTML file to write (self-contained, opens offline).")
@click.option("--layer", default=None, help="Layer to show unit by unit (default: the plan's last layer).")
@click.option("--units", "max_units", type=click.IntRange(1), default=12, show_default=True,
              help="Split units to show.")
@click.option("--order", type=click.Choice(["gain", "index", "random"]), default="gain", show_default=True,
              help="Which split units: largest purity gain first, by index, or a random sample.")
def report_command(output, layer, max_units, order, **options):
    """Write a static HTML report: summary plots and each split unit beside its sub-units' top images."""
    from elude_export.evidence.report import build_report, write_report

    if output.is_dir() or not output.parent.exists():
        raise DataError(f"cannot write report to {output}: give a file in an existing directory")
    if layer is not None:  # fail before the (long) evaluation
        from elude_export.plan import load_plan

        load_plan(options["plan_path"]).layer(layer)
        wanted = split_patterns(options["layer_patterns"])
        if wanted and layer not in wanted:
            raise DataError(f"--layer {layer} is not among the evaluated --layers {', '.join(wanted)}")
    plan, loaded, source, result, device = _evaluate(**options)
    html = build_report(loaded, plan, source, result, layer, max_units, order, device, options["seed"])
    write_report(html, output)
    click.echo(result.table())
    click.echo(f"wrote {output} ({len(html) / 1e6:.1f} MB)")


@click.command("steer")
@click.option("--plan", "plan_path", required=True, type=click.Path(path_type=Path), help="Plan file.")
@click.option("--subunit", required=True, help="Sub-unit name, e.g. blocks.3.mlp/0042.1 (see `elude inspect`).")
@click.option("--scale", type=float, default=0.0, show_default=True, help="Steer: 0 ablates, 1 is neutral, 2 doubles.")
@click.option("--whole-unit", is_flag=True, help="Scale every sub-unit of the unit (the neuron-level baseline).")
@click.option("--model", default=None, help="Model the plan was fitted on (default: the plan's model name).")
@model_options
@click.option("--data", default="embedded:test", show_default=True, help="Images to measure the effect on.")
@click.option("--limit", type=click.IntRange(1), default=None)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def steer_command(plan_path, subunit, scale, whole_unit, model, checkpoint, pretrained, img_size, data, limit,
                  batch_size, device, json_out):
    """Scale one sub-unit and show how class probabilities change where it is routed vs where its siblings are."""
    from elude_export.models import resolve_device
    from elude_export.data.sources import open_source
    from elude_export.evidence.steering import resolve_subunit, steer_effect

    if json_out is not None and not json_out.parent.exists():
        raise DataError(f"output directory {json_out.parent} does not exist")
    plan, loaded = _load(plan_path, model, checkpoint, pretrained, img_size)
    resolve_subunit(plan, subunit)  # fail on a bad name before touching data
    source = open_source(data, (loaded.input_spec.height, loaded.input_spec.width))
    result = steer_effect(loaded, plan, subunit, scale, source, whole_unit, limit, batch_size, resolve_device(device))
    click.echo(result.table())
    if json_out is not None:
        write_json_atomic(json_out, result.to_json(), DataError)
        click.echo(f"wrote {json_out}")


@click.command("label")
@click.option("--plan", "plan_path", required=True, type=click.Path(path_type=Path), help="Plan file.")
@click.option("--data", default="embedded:test", show_default=True,
              help="Labelled images to describe the columns by (concepts where the data has them, else classes).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("labels.json"),
              show_default=True, help="Labels file to write (atomically); carries the plan's fingerprint.")
@click.option("--model", default=None, help="Model the plan was fitted on (default: the plan's model name).")
@model_options
@click.option("--layers", "layer_patterns", multiple=True, help="Label only these plan layers (exact paths).")
@click.option("--top-n", type=click.IntRange(2), default=20, show_default=True,
              help="Top-activating images a label is computed from; columns firing on fewer are 'unlabelled'.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use at most this many images.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True)
def label_command(plan_path, data, output, model, checkpoint, pretrained, img_size, layer_patterns, top_n, limit,
                  batch_size, device):
    """Describe every unit and sub-unit by its top images on a labelled set, for `elude export --labels`."""
    from elude_export.artifacts import check_output_path
    from elude_export.evidence.evaluate import check_layers
    from elude_export.evidence.labels import compute_labels
    from elude_export.models import resolve_device

    check_output_path(output, DataError, "labels.json")
    plan, loaded = _load(plan_path, model, checkpoint, pretrained, img_size)
    layers = split_patterns(layer_patterns)
    check_layers(plan, layers)
    source = _source(data, loaded, "label")
    labels = compute_labels(loaded, plan, source, top_n, layers, batch_size, limit, resolve_device(device))
    labels.write(output)
    labelled, unlabelled = labels.counts()
    click.echo(f"wrote {output}: {labelled} labelled and {unlabelled} unlabelled columns (units and sub-units; "
               f"top-{top_n} {labels.basis}s of {source.name})")
