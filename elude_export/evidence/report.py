"""A static, offline HTML report of an evaluation: what each split unit and its sub-units fire on.

One self-contained file (inline CSS, images as base64 PNG, no scripts, no CDN): summary plots
(K per layer, purity histograms of units / sub-units / random control / SAE) and, for one
layer, every shown split unit next to its sub-units with their top-activating images. On
each image the patch where the column is most active is outlined (red); when the maximum
sits on the CLS token the image gets a yellow frame instead.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from elude_export.artifacts import check_output_path, write_text_atomic
from elude_export.data.sources import ImageSource
from elude_export.errors import DataError
from elude_export.export.contract import SubunitLabel
from elude_export.evidence.baselines.base import ELUDE, UNITS, delta_key
from elude_export.evidence.labels import label_columns
from elude_export.evidence.results import ColumnSet, EvalResult, LayerEvaluation
from elude_export.models import LoadedModel, normalize_images
from elude_export.plan import Plan
from elude_export.rewrite import apply_plan, disentangled_layers
from elude_export.vocabulary import IMAGE_POOLING, TOKEN_TAP

ORDERS = ("gain", "index", "random")


def _png(figure_or_image: Any) -> str:
    """base64 PNG of a matplotlib figure or a PIL image."""
    buffer = io.BytesIO()
    if hasattr(figure_or_image, "savefig"):
        figure_or_image.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(figure_or_image)
    else:
        figure_or_image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _main_metric(result: EvalResult) -> str:
    has_concepts = any(row.get("concept_purity", {}).get("mean") is not None
                       for layer in result.layers for row in layer.summary)
    return "concept_purity" if has_concepts else "label_purity"


def summary_plots(result: EvalResult) -> dict[str, str]:
    """K distribution per layer and purity histograms per layer, as base64 PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    figure, axis = plt.subplots(figsize=(7, 3))
    k_values = sorted({k for layer in result.layers for k in layer.k_counts})
    width = 0.8 / max(1, len(k_values))
    for offset, k in enumerate(k_values):
        counts = [layer.k_counts.get(k, 0) for layer in result.layers]
        axis.bar(np.arange(len(result.layers)) + offset * width, counts, width, label=f"K={k}")
    axis.set_xticks(np.arange(len(result.layers)) + width * (len(k_values) - 1) / 2)
    axis.set_xticklabels([layer.path for layer in result.layers], fontsize=8)
    axis.set_ylabel("units")
    axis.set_title("sub-units per unit (K) by layer")
    axis.legend(fontsize=8)
    plots["k_distribution"] = _png(figure)

    metric = _main_metric(result)
    columns = len(result.layers)
    figure, axes = plt.subplots(1, columns, figsize=(3.2 * columns, 2.8), squeeze=False)
    bins = np.linspace(0, 1, 21)
    for axis, layer in zip(axes[0], result.layers):
        for method, column_set in layer.columns.items():
            values = column_set.metrics.get(metric, np.array([]))
            values = values[~np.isnan(values)]
            if len(values):
                axis.hist(values, bins=bins, histtype="step", density=True, linewidth=1.5,
                          color=result.baselines[method].color, label=f"{method} ({values.mean():.2f})")
        axis.set_title(layer.path, fontsize=9)
        axis.set_xlabel(metric.replace("_", " "), fontsize=8)
        axis.legend(fontsize=7)
    figure.suptitle(f"{metric.replace('_', ' ')} of the top-{result.top_n} images (density; mean in legend)",
                    fontsize=10)
    plots["purity_histograms"] = _png(figure)
    return plots


def pick_units(layer: LayerEvaluation, metric: str, count: int, order: str, seed: int = 0) -> list[int]:
    """Split units to show; `gain` = best first by mean sub-unit metric minus the unit's."""
    if order not in ORDERS:
        raise DataError(f"unknown order '{order}' (use {', '.join(ORDERS)})")
    units = layer.columns[UNITS]
    elude = layer.columns[ELUDE]
    split = np.nonzero(units.split)[0]
    if order == "index":
        return split[:count].tolist()
    if order == "random":
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(split, size=min(count, len(split)), replace=False).tolist())
    gains = []
    for unit in split:
        sub = elude.metrics[metric][elude.parent == unit]
        base = units.metrics[metric][unit]
        gains.append(np.nanmean(sub) - base if np.isfinite(sub).any() and np.isfinite(base) else -np.inf)
    return [int(split[i]) for i in np.argsort(gains)[::-1][:count]]


@torch.no_grad()
def argmax_tokens(loaded: LoadedModel, plan: Plan, source: ImageSource, path: str, unit: int,
                  columns: list[int], images: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """For the given (n, len(columns)) top images: the token where the unit / each sub-unit peaks.

    Returns (unit_tokens (n,), subunit_tokens (n, len(columns))) for the images of the unit and
    of each sub-unit respectively (one rewritten forward with token taps).
    """
    model = apply_plan(loaded.model.eval(), plan, layers=[path], poolings=(), token_taps=True).to(device)
    layer = disentangled_layers(model)[path]
    dtype = next(model.parameters()).dtype
    flat = np.unique(images.reshape(-1))
    batch = normalize_images(source.load(flat), plan.input_spec).to(device=device, dtype=dtype)
    captured: list[torch.Tensor] = []
    hook = layer.consumer.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model(batch)
    finally:
        hook.remove()
    hidden = layer.consumer.tokens(captured[-1])  # (B, T, H) in the layer's own layout rule (ViT or CNN)
    tokens = layer.taps[TOKEN_TAP]  # (B, T, S)
    position = {int(image): row for row, image in enumerate(flat)}
    unit_images, sub_images = images[:, 0], images[:, 1:]
    unit_tokens = np.array([int(hidden[position[int(i)], :, unit].argmax()) for i in unit_images])
    sub_tokens = np.zeros(sub_images.shape, dtype=np.int64)
    for c, column in enumerate(columns):
        for r, image in enumerate(sub_images[:, c]):
            sub_tokens[r, c] = int(tokens[position[int(image)], :, column].argmax())
    return unit_tokens, sub_tokens


def _patch_box(model: nn.Module, token: int, display: int,
               spec_size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Pixel box of a token on a `display`-sized image, None for prefix (CLS) tokens or non-ViTs."""
    patch_embed = getattr(model, "patch_embed", None)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if patch_embed is None or token < prefix:
        return None
    grid_h, grid_w = patch_embed.grid_size
    patch_h, patch_w = patch_embed.patch_size
    row, col = divmod(token - prefix, grid_w)
    if row >= grid_h:
        return None
    sy, sx = display / spec_size[0], display / spec_size[1]
    return (int(col * patch_w * sx), int(row * patch_h * sy), int((col + 1) * patch_w * sx) - 1,
            int((row + 1) * patch_h * sy) - 1)


def image_grid(images: np.ndarray, boxes: list[tuple[int, int, int, int] | None], active: list[bool],
               per_row: int = 5, display: int = 64) -> str:
    """Tile uint8 NHWC images into one PNG, outlining each image's peak patch."""
    from PIL import Image, ImageDraw

    gap = 3
    rows = max(1, int(np.ceil(len(images) / per_row)))
    canvas = Image.new("RGB", (per_row * (display + gap) + gap, rows * (display + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (image, box, fired) in enumerate(zip(images, boxes, active)):
        tile = Image.fromarray(image).convert("RGB").resize((display, display), Image.NEAREST)
        if not fired:  # fewer than n active images: the tail is shown faded, honestly
            tile = Image.blend(tile, Image.new("RGB", tile.size, (255, 255, 255)), 0.7)
        x, y = gap + (i % per_row) * (display + gap), gap + (i // per_row) * (display + gap)
        canvas.paste(tile, (x, y))
        if box is not None:
            draw.rectangle((x + box[0], y + box[1], x + box[2], y + box[3]), outline=(255, 40, 40), width=2)
        else:
            draw.rectangle((x, y, x + display - 1, y + display - 1), outline=(255, 210, 0), width=2)
    return _png(canvas)


def _caption(column_set: ColumnSet, index: int, n_images: int, source: ImageSource, top_n: int) -> str:
    metrics = column_set.metrics
    label = label_columns([column_set.names[index]], column_set.images[:, [index]], column_set.active[[index]],
                          source, top_n)[column_set.names[index]]
    parts = [f"<b>{html.escape(column_set.names[index])}</b>", f"label: <b>{html.escape(_label_text(label))}</b>",
             f"fires on {column_set.active[index] / max(n_images, 1):.1%} of images"]
    scored = column_set.active[index] >= top_n
    if not scored:
        fired = int(column_set.active[index])
        parts.append(f"<span class='warn'>unscored: fires on {fired} &lt; {top_n} images</span>")
    for metric, label in (("label_purity", "label purity"), ("concept_purity", "concept purity"),
                          ("coherence", "coherence")):
        value = metrics.get(metric, np.array([np.nan]))[index]
        if np.isfinite(value):
            parts.append(f"{label} {value:.2f}")
    images = column_set.images[:top_n, index]
    if scored and source.labels is not None:
        majority = np.bincount(source.labels[images]).argmax()
        name = source.class_names[majority] if source.class_names else f"class {majority}"
        parts.append(f"majority: {html.escape(str(name))}")
    if scored and source.concepts is not None:
        concept = int(np.bincount(source.concepts[images]).argmax())
        parts.append(f"majority concept: {html.escape(_concept_name(concept))}")
    return "<br>".join(parts)


def _label_text(label: SubunitLabel) -> str:
    """The label as `elude label` writes it, with the interval of its share."""
    if label.ci is None:
        return label.text
    return f"{label.text}; share CI [{label.ci[0]:.2f}, {label.ci[1]:.2f}]" + (
        f"; runner-up {label.runner_up}" if label.runner_up else "")


def _concept_name(concept: int) -> str:
    try:
        from elude_export.data.concepts import concept_name

        return concept_name(concept)
    except (ImportError, ValueError):
        return f"concept {concept}"


def _summary_table(result: EvalResult) -> str:
    metric_names = ["label_purity", "concept_purity", "coherence"]
    head = "".join(f"<th>{m.replace('_', ' ')}</th><th>Δ vs units</th>" for m in metric_names)
    rows = []
    for layer in result.layers:
        for row in layer.summary:
            cells = [html.escape(layer.path), row["method"], row["scope"], str(row["columns"]), str(row["unscored"])]
            for metric in metric_names:
                stat = row.get(metric) or {}
                delta = (row.get(delta_key(UNITS)) or {}).get(metric) or {}
                cells.append("-" if stat.get("mean") is None else
                             f"{stat['mean']:.3f} [{stat['ci'][0]:.3f}, {stat['ci'][1]:.3f}]")
                cells.append("-" if delta.get("delta") is None else
                             f"{delta['delta']:+.3f} [{delta['ci'][0]:+.3f}, {delta['ci'][1]:+.3f}]")
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<table><tr><th>layer</th><th>method</th><th>scope</th><th>columns</th><th>unscored</th>" + head
            + "</tr>" + "".join(rows) + "</table>")


CSS = """
body { font-family: system-ui, sans-serif; margin: 20px; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
.unit { border: 1px solid #bbb; border-radius: 6px; padding: 8px; margin: 12px 0; }
.row { display: flex; flex-wrap: wrap; gap: 10px; }
.card { font-size: 11px; max-width: 340px; }
.card.parent { background: #eef3fb; padding: 4px; border-radius: 4px; }
.warn { color: #b00; }
img { image-rendering: pixelated; }
"""


def build_report(loaded: LoadedModel, plan: Plan, source: ImageSource, result: EvalResult, layer: str | None = None,
                 max_units: int = 12, order: str = "gain", device: torch.device | str = "cpu", seed: int = 0) -> str:
    """The report as one HTML string."""
    device = torch.device(device)
    chosen = _choose_layer(result, layer)
    metric = _main_metric(result)
    plots = summary_plots(result)
    units = pick_units(chosen, metric, max_units, order, seed)
    body = [
        f"<h1>ELUDe report: {html.escape(result.model)}</h1>",
        f"<p>plan router <b>{html.escape(result.router)}</b>; evaluation data <b>{html.escape(result.data)}</b> "
        f"({result.n_images} images, not used for fitting); top-{result.top_n} images per column, image "
        f"activation = {IMAGE_POOLING} over tokens. Accuracy: original {result.accuracy['original']:.4f}, rewritten "
        f"{result.accuracy['rewritten']:.4f} (logits bitwise equal: "
        f"{'yes' if result.accuracy['rewritten_logits_bitwise_equal'] else 'NO'}).</p>",
        "<h2>Summary</h2>", _summary_table(result),
        f"<p>Columns firing on fewer than {result.top_n} images are unscored and excluded from means.</p>",
        f"<img alt='K distribution' src='data:image/png;base64,{plots['k_distribution']}'>",
        f"<img alt='purity histograms' src='data:image/png;base64,{plots['purity_histograms']}'>",
        f"<h2>Layer {html.escape(chosen.path)}: {len(units)} split unit(s), ordered by "
        f"{_order_text(order, metric)}</h2>",
    ]
    if not units:
        body.append("<p>No unit of this layer was split.</p>")
    for unit in units:
        body.append(_unit_section(loaded, plan, source, result, chosen, unit, device))
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>ELUDe report</title><style>" + CSS
            + "</style></head><body>" + "\n".join(body) + "</body></html>")


def _order_text(order: str, metric: str) -> str:
    if order == "gain":
        return f"gain in {metric.replace('_', ' ')} (best first: a selection, not a sample)"
    return "unit index" if order == "index" else "a random sample"


def _choose_layer(result: EvalResult, layer: str | None) -> LayerEvaluation:
    if layer is None:
        return result.layers[-1]
    for candidate in result.layers:
        if candidate.path == layer:
            return candidate
    raise DataError(f"layer '{layer}' was not evaluated (layers: {', '.join(l.path for l in result.layers)})")


def _unit_section(loaded: LoadedModel, plan: Plan, source: ImageSource, result: EvalResult,
                  layer: LayerEvaluation, unit: int, device: torch.device) -> str:
    n = result.top_n
    units, elude = layer.columns[UNITS], layer.columns[ELUDE]
    sub_columns = np.nonzero(elude.parent == unit)[0].tolist()
    images = np.concatenate([units.images[:n, [unit]], elude.images[:n, sub_columns]], axis=1)
    unit_tokens, sub_tokens = argmax_tokens(loaded, plan, source, layer.path, unit, sub_columns, images, device)
    spec_size = (plan.input_spec.height, plan.input_spec.width)
    display = 64

    def card(column_set: ColumnSet, index: int, picked: np.ndarray, tokens: np.ndarray, css: str) -> str:
        values = column_set.values[:n, index]
        boxes = [_patch_box(loaded.model, int(t), display, spec_size) for t in tokens]
        grid = image_grid(source.load(picked), boxes, [bool(v > 0) for v in values], display=display)
        return (f"<div class='card {css}'><img alt='top images' src='data:image/png;base64,{grid}'><br>"
                f"{_caption(column_set, index, result.n_images, source, n)}</div>")

    cards = [card(units, unit, images[:, 0], unit_tokens, "parent")]
    for c, column in enumerate(sub_columns):
        cards.append(card(elude, column, images[:, 1 + c], sub_tokens[:, c], ""))
    return (f"<div class='unit'><b>unit {unit}</b> (K={len(sub_columns)}): the unit, then its sub-units"
            f"<div class='row'>{''.join(cards)}</div></div>")


def write_report(text: str, path: str | Path) -> Path:
    """Write atomically so a reader never sees half a report, with the mode open() would give it."""
    path = Path(path)
    check_output_path(path, DataError, "report.html")
    return write_text_atomic(path, text, DataError)
