"""`elude evaluate`, `elude report`, `elude steer`, `elude label`: the evidence that sub-units are worth having."""

from __future__ import annotations

from pathlib import Path

import click

from elude_export.cli.core import DEVICE, load_model_from_options, model_options, split_patterns
from elude_export.artifacts import write_json_atomic
from elude_export.errors import DataError



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
@click.option("--subunit", default=None, help="Sub-unit name, e.g. blocks.3.mlp/0042.1 (see `elude inspect`).")
@click.option("--scale", type=float, default=0.0, show_default=True, help="Steer: 0 ablates, 1 is neutral, 2 doubles.")
@click.option("--whole-unit", is_flag=True, help="Scale every sub-unit of the unit (the neuron-level baseline).")
@click.option("--evaluate", "evaluate_concepts", is_flag=True,
              help="Instead of one sub-unit: ablate, for each ground-truth concept, the sub-units labelled with it vs "
                   "their parent units (vs SAE latents with --sae) and print the selectivity table (concept data).")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --evaluate: labels from `elude label` (same plan, concept data); default: computed on "
                   "--label-data.")
@click.option("--label-data", default="embedded:calib", show_default=True,
              help="With --evaluate and no --labels: images the columns are labelled on (not the measured ones).")
@click.option("--layers", "layer_patterns", multiple=True,
              help="With --evaluate: ablate in these plan layers only (default: every plan layer).")
@click.option("--per-concept", type=click.IntRange(1), default=32, show_default=True,
              help="With --evaluate: held-out images per concept the effects are measured on.")
@click.option("--min-share", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="With --evaluate: label share a column needs to count as the concept's.")
@click.option("--sae/--no-sae", default=False, show_default=True,
              help="With --evaluate: also train a TopK SAE per layer on --label-data and ablate its latents (slow).")
@click.option("--sae-steps", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--model", default=None, help="Model the plan was fitted on (default: the plan's model name).")
@model_options
@click.option("--data", default="embedded:test", show_default=True, help="Images to measure the effect on.")
@click.option("--limit", type=click.IntRange(1), default=None)
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Default 64; 256 with --evaluate.")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def steer_command(plan_path, subunit, scale, whole_unit, evaluate_concepts, labels_path, label_data, layer_patterns,
                  per_concept, min_share, sae, sae_steps, model, checkpoint, pretrained, img_size, data, limit,
                  batch_size, device, json_out):
    """Scale one sub-unit and show how class probabilities change where it is routed vs where its siblings are.

    With --evaluate: concept-selective steering, measured (see docs/evidence.md).
    """
    from elude_export.models import resolve_device
    from elude_export.data.sources import open_source
    from elude_export.evidence.steering import resolve_subunit, steer_effect

    if json_out is not None and not json_out.parent.exists():
        raise DataError(f"output directory {json_out.parent} does not exist")
    if evaluate_concepts and (subunit is not None or whole_unit or scale != 0.0):
        raise DataError("--evaluate ablates every concept's columns itself: drop --subunit, --whole-unit and --scale")
    if not evaluate_concepts and subunit is None:
        raise DataError("give --subunit NAME (one sub-unit to steer) or --evaluate (the concept selectivity table)")
    plan, loaded = _load(plan_path, model, checkpoint, pretrained, img_size)
    batch_size = batch_size or (256 if evaluate_concepts else 64)
    if evaluate_concepts:
        result = _concept_selectivity(plan, loaded, labels_path, label_data, data, split_patterns(layer_patterns),
                                      per_concept, min_share, sae, sae_steps, batch_size, resolve_device(device))
    else:
        resolve_subunit(plan, subunit)  # fail on a bad name before touching data
        source = open_source(data, (loaded.input_spec.height, loaded.input_spec.width))
        result = steer_effect(loaded, plan, subunit, scale, source, whole_unit, limit, batch_size,
                              resolve_device(device))
    click.echo(result.table())
    if json_out is not None:
        write_json_atomic(json_out, result.to_json(), DataError)
        click.echo(f"wrote {json_out}")


def _concept_selectivity(plan, loaded, labels_path, label_data, data, layers, per_concept, min_share, sae, sae_steps,
                         batch_size, device):
    """`steer --evaluate`: label (or read the labels), then ablate concept by concept."""
    from elude_export.data.sources import open_source
    from elude_export.evidence.baselines.sae_model import SAEConfig
    from elude_export.evidence.evaluate import check_layers
    from elude_export.evidence.labels import compute_labels, load_labels
    from elude_export.evidence.selectivity import concept_selectivity

    check_layers(plan, layers)
    size = (loaded.input_spec.height, loaded.input_spec.width)
    source = open_source(data, size)
    if source.concepts is None:
        raise DataError(f"--evaluate needs data with ground-truth concepts (embedded:test), not {data}")
    label_source = _source(label_data, loaded, "label") if labels_path is None or sae else None
    if labels_path is None and label_source is not None and label_source.concepts is None:
        raise DataError(f"--label-data {label_data} has no ground-truth concepts: use embedded:calib")
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    if labels_path is not None:
        labels = load_labels(labels_path, plan.fingerprint())
    else:
        assert label_source is not None
        labels = compute_labels(loaded, plan, label_source, layers=layers, batch_size=batch_size, device=device,
                                log=log)
    if labels.data == source.name:
        click.echo(f"note: the labels were computed on {labels.data}, the images measured; columns picked by their "
                   "top images there look more selective than they are (label on embedded:calib)", err=True)
    if labels.basis != "concept":
        raise DataError(f"labels from {labels.data or 'that file'} name classes, not concepts: label on concept data "
                        "(embedded:calib or embedded:test)")
    return concept_selectivity(loaded, plan, labels.labels, source, layers or [layer.path for layer in plan.layers],
                               min_share, per_concept, label_source,
                               SAEConfig(n_latents=1, k=32, steps=sae_steps, batch_size=512) if sae else None,
                               batch_size=batch_size, device=device, label_data=labels.data, log=log)


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
