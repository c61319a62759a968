"""`elude calibrate` (one shard into a part) and `elude fit` (in one process, from parts, or on Ray)."""

from __future__ import annotations

from pathlib import Path

import click

from elude_export.cli.core import DEVICE, load_model_from_options, model_options, split_patterns
from elude_export.errors import DataError


def calibration_options(command):
    """What decides the calibration state: shared by `calibrate` and `fit` so parts and fits agree."""
    for option in reversed((
        click.option("--data", default="embedded:calib", show_default=True,
                     help="Calibration images: embedded[:split], digits[:split], a .npy/.npz file, a CIFAR batch "
                          "folder or an image folder. Labels are not used."),
        click.option("--limit", type=int, default=None, help="Use at most this many calibration images."),
        click.option("--layers", "layer_patterns", multiple=True,
                     help="Glob(s) of module paths to rewrite, e.g. 'blocks.*.mlp' (default: every neuron layer)."),
        click.option("--router", type=click.Choice(["context", "token"]), default="context", show_default=True,
                     help="context: route every token of an image by its CLS input (purer sub-units); token: per token."),
        click.option("--top-m", type=click.IntRange(8), default=256, show_default=True,
                     help="Top activations per unit to cluster."),
        click.option("--per-image-cap", type=click.IntRange(1), default=2, show_default=True,
                     help="Token router: at most this many tokens of one image per unit."),
        click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True),
        click.option("--device", type=DEVICE, default="auto", show_default=True,
                     help="Where forwards and clustering run."),
    )):
        command = option(command)
    return model_options(command)


def _config(**values):
    from elude_export.fitting.fit import FitConfig

    layers = split_patterns(values.pop("layer_patterns"))
    return FitConfig(layers=layers, **{k: v for k, v in values.items() if v is not None or k == "limit"})


@click.command("calibrate")
@click.argument("model", default="embedded")
@calibration_options
@click.option("--shard", "shard_spec", default="0/1", show_default=True,
              help="i/n: calibrate the i-th of n shards of the images (cut on batch boundaries).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Calibration part to write (atomically), e.g. part_0.safetensors.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def calibrate_command(model, checkpoint, pretrained, img_size, data, limit, layer_patterns, router, top_m,
                      per_image_cap, batch_size, device, shard_spec, output, quiet):
    """Calibrate one shard of the images into a part; `elude fit MODEL --from-parts part_*` merges them."""
    from elude_export.data.sources import open_source
    from elude_export.fitting.sharded import calibrate_shard
    from elude_export.fitting.shards import parse_shard
    from elude_export.models import resolve_device

    shard = parse_shard(shard_spec)
    if not output.parent.exists():
        raise DataError(f"output directory {output.parent} does not exist")
    target = resolve_device(device)
    loaded = load_model_from_options(model, checkpoint, pretrained, img_size)
    source = open_source(data, (loaded.input_spec.height, loaded.input_spec.width))
    config = _config(router=router, top_m=top_m, per_image_cap=per_image_cap, batch_size=batch_size, limit=limit,
                     layer_patterns=layer_patterns)
    part = calibrate_shard(loaded, source, data, config, shard, target, progress=not quiet)
    part.save(output)
    start, stop = part.image_range
    click.echo(f"wrote {output}: shard {shard.label}, images {start}..{stop - 1}, {len(part.activations)} layer(s)")


@click.command("fit")
@click.argument("model", default="embedded")
@click.argument("parts", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@calibration_options
@click.option("--from-parts", is_flag=True,
              help="Merge the calibration parts given after MODEL (from `elude calibrate --shard i/n`) instead of "
                   "calibrating; their data and calibration settings are used.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Calibrate shards as Ray tasks: on the cluster at ADDRESS, or on a local one started here.")
@click.option("--shards", type=click.IntRange(1), default=4, show_default=True, help="With --ray: number of shards.")
@click.option("--k-max", type=click.IntRange(1, 16), default=8, show_default=True, help="Most sub-units per unit.")
@click.option("--k-rule", type=click.Choice(["gap", "fixed"]), default="gap", show_default=True,
              help="gap: split a unit only where its clusters beat a covariance-matched null; fixed: every unit gets --k-max.")
@click.option("--min-gain", type=float, default=0.02, show_default=True,
              help="gap rule: required dispersion gain over the null for each extra sub-unit.")
@click.option("--router-rank", type=click.IntRange(1), default=None,
              help="Also store a rank-r factorisation of the routing matrix (cheaper routing).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("plan.safetensors"),
              show_default=True, help="Plan file to write (atomically).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def fit_command(model, parts, checkpoint, pretrained, img_size, data, limit, layer_patterns, router, top_m,
                per_image_cap, batch_size, device, from_parts, ray_address, shards, k_max, k_rule, min_gain,
                router_rank, seed, output, quiet):
    """Fit a plan: calibrate MODEL on unlabelled images and split its neurons into sub-units."""
    from dataclasses import replace

    from elude_export.data.sources import open_source
    from elude_export.fitting.fit import fit
    from elude_export.fitting.parts import load_part, merge_parts
    from elude_export.fitting.sharded import ModelRef, model_identity
    from elude_export.fitting.shards import ShardError
    from elude_export.models import resolve_device

    if parts and not from_parts:
        raise DataError(f"unexpected argument(s) {' '.join(map(str, parts))}: calibration parts need --from-parts")
    if from_parts and not parts:
        raise ShardError("--from-parts needs the part files after MODEL, e.g. elude fit MODEL --from-parts part_*")
    if from_parts and ray_address:
        raise DataError("use either --from-parts or --ray, not both")
    if not output.parent.exists():
        raise DataError(f"output directory {output.parent} does not exist")
    target = resolve_device(device)
    loaded = load_model_from_options(model, checkpoint, pretrained, img_size)
    config = _config(router=router, top_m=top_m, per_image_cap=per_image_cap, k_max=k_max, k_rule=k_rule,
                     min_gain=min_gain, router_rank=router_rank, batch_size=batch_size, limit=limit, seed=seed,
                     layer_patterns=layer_patterns)
    activations = None
    if from_parts or ray_address:
        if from_parts:
            merged = merge_parts([load_part(path) for path in parts], [str(path) for path in parts])
        else:
            from elude_export.fitting.ray_runner import calibrate_on_ray

            ref = ModelRef(model, str(checkpoint) if checkpoint else None, pretrained, img_size)
            merged = merge_parts(calibrate_on_ray(ref, data, config, shards, ray_address, target.type))
        if merged.model["fingerprint"] != model_identity(loaded)["fingerprint"]:
            raise ShardError(f"the parts were calibrated on another model ({merged.model['name']}, "
                             f"{merged.model['fingerprint'][:12]}) than {model}")
        data = merged.settings["data"]
        config = replace(config, **{k: v for k, v in merged.settings.items() if k != "data"})
        activations = merged.activations
    source = open_source(data, (loaded.input_spec.height, loaded.input_spec.width))
    report = fit(loaded, source, config, target, progress=not quiet, log=click.echo, activations=activations)
    report.plan.save(output)
    seconds = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    memory = ", ".join(f"{k} {v:.0f} MB" for k, v in report.peak_memory_mb.items())
    click.echo(f"wrote {output}: {len(report.plan.layers)} layer(s), {report.plan.n_subunits} sub-units "
               f"({seconds}; peak {memory})")
