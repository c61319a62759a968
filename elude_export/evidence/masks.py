"""Token-level evidence: do a column's token activations fall on the object?

The concept images have known object masks (`data.concepts.object_masks`). For a column's
top-n images, take on each image the column's `top_tokens` most active patch tokens and ask
what share of their activation mass lies on patches that are mostly object (>= half of the
patch's pixels). Chance is the share of object patches. A context-routed sub-unit inherits its
unit's token map on the images routed to it, a token-routed one keeps only the tokens routed to
it, an SAE latent has its own map: this is where the three differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from elude_export.data.sources import ImageSource
from elude_export.errors import DataError

TOP_TOKENS = 4  # of 64 patches: the peak of a column's map, not its diffuse tail


def patch_masks(pixel_masks: np.ndarray, patch: int, min_fraction: float = 0.5) -> np.ndarray:
    """(N, H, W) bool object masks -> (N, (H/patch) * (W/patch)) bool: patch is mostly object."""
    n, height, width = pixel_masks.shape
    if height % patch or width % patch:
        raise DataError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
    blocks = pixel_masks.reshape(n, height // patch, patch, width // patch, patch).mean((2, 4))
    return (blocks >= min_fraction).reshape(n, -1)


def mask_share(token_activations: torch.Tensor, on_object: torch.Tensor, top_tokens: int = TOP_TOKENS) -> torch.Tensor:
    """(B, P, C) patch-token activations, (B, P) bool -> (B, C) object share of the top tokens' mass.

    NaN where the column has no positive activation on the image's top tokens.
    """
    values, index = token_activations.float().clamp_min(0).topk(min(top_tokens, token_activations.shape[1]), dim=1)
    inside = on_object[:, :, None].expand_as(token_activations).gather(1, index).float()
    mass = values.sum(1)
    return torch.where(mass > 0, (values * inside).sum(1) / mass.clamp_min(1e-12), torch.nan)


def column_mask_share(image_max: np.ndarray, share: np.ndarray, top_n: int) -> np.ndarray:
    """(N, C) image activations and per-image shares -> (C,) mean share over each column's top-n images.

    NaN for columns firing on fewer than `top_n` images (unscored, as in the evaluation).
    """
    top = np.argsort(-image_max, axis=0, kind="stable")[:top_n]  # (n, C)
    picked = np.take_along_axis(share, top, axis=0)
    fired = (image_max > 0).sum(0)
    counted = (~np.isnan(picked)).sum(0)
    values = np.nansum(picked, axis=0) / np.maximum(counted, 1)
    return np.where((fired >= top_n) & (counted > 0), values, np.nan)


@dataclass
class MaskRow:
    layer: str
    method: str
    columns: int
    scored: int
    mean: float | None
    ci: tuple[float | None, float | None]
    chance: float


def object_patches(source: ImageSource, patch: int) -> np.ndarray:
    """(N, P) object patches of an embedded concept split (`embedded:<split>`)."""
    from elude_export.data.concepts import SPLITS, load_split, object_masks

    parent = getattr(source, "parent", source)  # a subset of a split: its own images of the split
    split = parent.name.split(":", 1)[1] if parent.name.startswith("embedded:") else ""
    if split not in SPLITS:
        raise DataError(f"{source.name} has no object masks: token-level evidence needs embedded concept data")
    masks = patch_masks(object_masks(load_split(split)), patch)
    return masks[source.indices] if parent is not source else masks


def summarise_shares(layer: str, shares: Mapping[str, tuple[np.ndarray, np.ndarray]], chance: float,
                     n_boot: int = 1000, seed: int = 0) -> list[MaskRow]:
    """One row per method: mean column share with a bootstrap CI over parent groups."""
    from elude_export.evidence.metrics import mean_ci

    rows = []
    for method, (values, groups) in shares.items():
        stat = mean_ci(values, groups, n_boot, seed)
        rows.append(MaskRow(layer, method, len(values), int(stat["n"]), stat["mean"], tuple(stat["ci"]), chance))
    return rows


def format_rows(rows: list[MaskRow], top_n: int, top_tokens: int) -> str:
    lines = [f"object share of the top-{top_tokens} tokens' activation mass, mean over each column's top-{top_n} "
             "images, averaged over scored columns [95% CI over parent units]; chance = share of object patches",
             "", "| layer | method | columns | scored | mask share | chance |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = "-" if r.mean is None else f"{r.mean:.3f} [{r.ci[0]:.3f}, {r.ci[1]:.3f}]"
        lines.append(f"| {r.layer} | {r.method} | {r.columns} | {r.scored} | {value} | {r.chance:.3f} |")
    return "\n".join(lines)


def rows_json(rows: list[MaskRow]) -> list[dict[str, Any]]:
    return [vars(r) for r in rows]


@torch.no_grad()
def token_mask_evidence(loaded: Any, plans: Mapping[str, Any], source: ImageSource, saes: Mapping[str, Any],
                        layers: list[str], top_n: int = 20, top_tokens: int = TOP_TOKENS, batch_size: int = 64,
                        device: torch.device | str = "cpu", n_boot: int = 1000) -> list[MaskRow]:
    """Mask share of units, each plan's sub-units (by router name) and the SAE latents, per layer."""
    from elude_export.models import model_batches
    from elude_export.rewrite import apply_plan, disentangled_layers
    from elude_export.vocabulary import TOKEN_TAP

    device = torch.device(device)
    model = loaded.model.eval()
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    patch = int(model.patch_embed.patch_size[0])
    on_object_all = torch.as_tensor(object_patches(source, patch))
    chance = float(on_object_all.float().mean())
    stored: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}

    def add(key: tuple[str, str], tokens: torch.Tensor, on_object: torch.Tensor) -> None:
        share = mask_share(tokens[:, prefix:], on_object, top_tokens)
        stored.setdefault(key, []).append((tokens.float().amax(1).cpu().numpy(), share.cpu().numpy()))

    groups: dict[tuple[str, str], np.ndarray] = {}
    for index, (router, plan) in enumerate(plans.items()):
        rewritten = apply_plan(model, plan, layers=layers, poolings=(), token_taps=True).to(device)
        rewritten_layers = disentangled_layers(rewritten)
        hidden: dict[str, torch.Tensor] = {}
        handles = [layer.consumer.register_forward_pre_hook(lambda m, args, path=path: hidden.__setitem__(path, m.tokens(args[0])))
                   for path, layer in rewritten_layers.items()]
        dtype = next(rewritten.parameters()).dtype
        try:
            for indices, batch in model_batches(source, loaded.input_spec, batch_size, device, dtype):
                rewritten(batch)
                on_object = on_object_all[indices].to(device)
                for path in layers:
                    add((path, f"{router} sub-units"), rewritten_layers[path].taps[TOKEN_TAP], on_object)
                    if index == 0:  # units and SAE latents do not depend on the router
                        h = hidden[path]
                        add((path, "units"), h, on_object)
                        if path in saes:
                            sae = saes[path]
                            z = sae.encode(h.float().reshape(-1, h.shape[-1])).reshape(*h.shape[:2], -1)
                            add((path, "sae"), z, on_object)
        finally:
            for handle in handles:
                handle.remove()
        for path in layers:
            groups[(path, f"{router} sub-units")] = plan.layer(path).columns()[0].numpy()
            groups[(path, "units")] = np.arange(plan.layer(path).n_units)
            if path in saes:
                groups[(path, "sae")] = np.arange(saes[path].n_latents)
    rows = []
    for path in layers:
        shares = {}
        for (layer, method), parts in stored.items():
            if layer == path:
                image_max = np.concatenate([m for m, _ in parts])
                share = np.concatenate([s for _, s in parts])
                shares[method] = (column_mask_share(image_max, share, top_n), groups[(layer, method)])
        order = sorted(shares, key=lambda m: (m != "units", m == "sae", m))
        rows += summarise_shares(path, {m: shares[m] for m in order}, chance, n_boot)
    return rows
