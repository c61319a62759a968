"""`elude inspect`, `elude demo`, and the model options every command shares (`fit` lives in `fitting.py`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from elude_export.artifacts import write_json_atomic
from elude_export.errors import EludeError

DEVICE = click.Choice(["auto", "cpu", "cuda"])  # where a command runs; "auto": CUDA when present
DEMO_PER_CONCEPT = 16  # held-out images per concept in the demo's steering table: ~8 s on 2 CPU cores

def model_options(command):
    """Options shared by every command that loads a model."""
    command = click.option("--img-size", type=int, default=None,
                           help="Build the timm model for this input size (e.g. 98 for a fast DINOv2).")(command)
    command = click.option("--pretrained", is_flag=True,
                           help="Download timm's pretrained weights (needs network).")(command)
    command = click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
                           help="Weights to load: .safetensors or a torch state dict (loaded with weights_only=True).")(command)
    return command


def load_model_from_options(model: str, checkpoint: Path | None, pretrained: bool, img_size: int | None):
    from elude_export.models import load_model

    kwargs = {"img_size": img_size} if img_size else None
    return load_model(model, checkpoint=checkpoint, pretrained=pretrained, model_kwargs=kwargs)


def split_patterns(values: tuple[str, ...]) -> list[str] | None:
    patterns = [p.strip() for value in values for p in value.split(",") if p.strip()]
    return patterns or None


@click.command("inspect")
@click.argument("plan_path", metavar="PLAN", type=click.Path(path_type=Path))
@click.option("--top", type=click.IntRange(0), default=5, show_default=True,
              help="Show this many most frequently firing sub-units per layer.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan manifest as JSON.")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Labels of this plan (`elude label`'s JSON, or an .onnx exported with --labels): list every "
                   "sub-unit with its label.")
def inspect_command(plan_path, top, as_json, labels_path):
    """Summarise a plan: layers, how many units were split, the K distribution, top sub-units (and their labels)."""
    from elude_export.plan import load_plan

    plan = load_plan(plan_path)
    labels = {}
    if labels_path is not None:  # read before printing anything: a bad file is one error line
        from elude_export.evidence.labels import labels_from_file

        labels = labels_from_file(labels_path, plan.fingerprint())
    if as_json:
        click.echo(json.dumps(plan.manifest(), indent=2))
        return
    click.echo(f"plan {plan_path}  model {plan.model_name} ({plan.model_fingerprint[:12]})  router {plan.router}"
               f"  created {plan.created}")
    click.echo(f"{'layer':<24}{'units':>7}{'split':>7}{'sub-units':>11}  K distribution")
    for layer in plan.layers:
        counts = {int(k): int(n) for k, n in zip(*layer.k.unique(return_counts=True))}
        dist = " ".join(f"K{k}:{n}" for k, n in sorted(counts.items()))
        click.echo(f"{layer.path:<24}{layer.n_units:>7}{layer.split_units.numel():>7}{layer.n_subunits:>11}  {dist}")
    if top and all("fire_rate" in layer.stats for layer in plan.layers):
        click.echo(f"\nmost frequently firing sub-units (fire rate on calibration images, top {top} per layer):")
        for layer in plan.layers:
            names = layer.subunit_names()
            rates = layer.stats["fire_rate"]
            order = rates.argsort(descending=True)[:top].tolist()
            listed = ", ".join(f"{names[i]} {rates[i]:.2f}" + (f" [{_label_text(labels, names[i])}]" if labels else "")
                               for i in order)
            click.echo(f"  {listed}")
    if labels:
        click.echo(f"\nsub-unit labels ({labels_path}):")
        for layer in plan.layers:
            for name in layer.subunit_names():
                click.echo(f"  {name}  {_label_text(labels, name)}")


def _label_text(labels, name: str) -> str:
    label = labels.get(name)
    return "no label" if label is None else label.text


@click.command("demo")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("elude-demo"),
              show_default=True, help="Where the plan (and exports) are written.")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--check-images", type=click.IntRange(8), default=512, show_default=True,
              help="Held-out images for the equality check.")
@click.option("--sae/--no-sae", default=False, show_default=True,
              help="Also train the sparse-autoencoder baseline in the evaluation (slower).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_command(out_dir, device, check_images, sae, quiet):
    """Run the whole pipeline on the embedded concept ViT and data, offline.

    fit -> plan -> lossless rewrite check -> ONNX export -> onnxruntime validation ->
    interpretability evaluation (units vs sub-units vs controls) on held-out images ->
    concept-selective steering (sub-units vs parent units, a small `elude steer --evaluate`).
    Labels (`elude label` on the fit images) go into the ONNX metadata and name the ablated columns.
    """
    from elude_export.models import resolve_device
    from elude_export.rewrite.equality import check_rewrite
    from elude_export.evidence.evaluate import EvalConfig, evaluate
    from elude_export.fitting.fit import FitConfig, fit
    from elude_export.models import load_model
    from elude_export.export.onnx_export import export_onnx
    from elude_export.data.sources import open_source
    from elude_export.export.validate import validate_export
    from elude_export.evidence.labels import compute_labels
    from elude_export.evidence.selectivity import concept_selectivity

    started = time.perf_counter()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EludeError(f"cannot create output directory {out_dir}: {exc.strerror}") from exc
    target = resolve_device(device)
    loaded = load_model("embedded")
    click.echo(f"model: embedded concept ViT ({sum(p.numel() for p in loaded.model.parameters()):,} parameters) "
               f"on {target}")
    report = fit(loaded, open_source("embedded:calib"), FitConfig(), target, progress=not quiet, log=click.echo)
    plan_path = report.plan.save(out_dir / "plan.safetensors")
    click.echo(f"plan: {plan_path} ({report.plan.n_subunits} sub-units)")

    click.echo(f"\nequality on {check_images} held-out images (embedded:test):")
    results = check_rewrite(loaded, report.plan, open_source("embedded:test"), check_images, device=target)
    for result in results:
        click.echo("  " + result.line())
    _print_layer_table(report.plan)
    if not all(result.ok for result in results):
        raise EludeError("rewritten model does not match the original within tolerance")

    calib, labelling = open_source("embedded:calib"), time.perf_counter()
    labels = compute_labels(loaded, report.plan, calib, batch_size=256, device=target)
    labels_path = labels.write(out_dir / "labels.json")
    labelled, unlabelled = labels.counts()
    click.echo(f"\nlabels: {labels_path} ({labelled} labelled, {unlabelled} unlabelled columns; top-20 concepts "
               f"of {calib.name}; {time.perf_counter() - labelling:.1f}s)")
    onnx_path = export_onnx(loaded, report.plan, out_dir / "model.onnx", taps="all:max,mean", steer=True,
                            labels=labels.labels)
    click.echo(f"\nexported {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB); validating under onnxruntime:")
    validation = validate_export(loaded, report.plan, onnx_path, open_source("embedded:test"), provider="auto")
    for line in validation.lines():
        click.echo("  " + line)
    validation.write_json(out_dir / "validation.json")
    if not validation.ok:
        raise EludeError("exported ONNX model does not match PyTorch within tolerance")

    click.echo("\ninterpretability on held-out images (embedded:test, ground-truth concepts):")
    config = EvalConfig(sae=sae)
    evaluation = evaluate(loaded, report.plan, open_source("embedded:test"), config,
                          sae_source=open_source("embedded:calib") if sae else None, device=target)
    click.echo(evaluation.table())

    click.echo(f"\nconcept-selective steering ({DEMO_PER_CONCEPT} held-out images per concept; the full table: "
               "`elude steer --evaluate --plan PLAN`):")
    selectivity = concept_selectivity(loaded, report.plan, labels.labels, open_source("embedded:test"),
                                      [layer.path for layer in report.plan.layers], per_concept=DEMO_PER_CONCEPT,
                                      device=target, label_data=calib.name)
    write_json_atomic(out_dir / "selectivity.json", selectivity.to_json(), EludeError)
    click.echo(selectivity.table())
    click.echo(f"\ndemo finished in {time.perf_counter() - started:.1f}s; artifacts in {out_dir}/")


def _print_layer_table(plan) -> None:
    click.echo(f"\n{'layer':<16}{'units':>7}{'split':>7}{'sub-units':>11}{'mean K (split)':>16}")
    for layer in plan.layers:
        split = layer.split_units.numel()
        mean_k = float(layer.k[layer.split_units].float().mean()) if split else 1.0
        click.echo(f"{layer.path:<16}{layer.n_units:>7}{split:>7}{layer.n_subunits:>11}{mean_k:>16.2f}")
