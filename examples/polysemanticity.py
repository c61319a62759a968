"""Show that the embedded model's MLP units are polysemantic on the concept dataset.

For every hidden unit `h_j` of every block (the input of `blocks[i].mlp.fc2`), take the
top-20 test images (image activation = max over tokens) and measure, with the dataset's
ground truth, how many concepts they span: concept entropy (bits; 0 = one concept,
log2(16) = 4 = uniform), concept purity (share of the majority concept), and the same
purity over class labels. High class purity with low concept purity is polysemanticity by
design: a unit serves one class through several of its unrelated concepts.

    python examples/polysemanticity.py [--checkpoint PATH] [--split test] [--top-n 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    # run as a script from a checkout without `pip install -e .`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elude_export.data.concepts import COLOURS, N_CLASSES, N_CONCEPTS, SHAPES, ConceptSet, load_split  # noqa: E402
from elude_export.models import normalize_images  # noqa: E402
from elude_export.models import create_embedded_model, embedded_input_spec, load_checkpoint_into  # noqa: E402


@torch.no_grad()
def image_unit_activations(model: nn.Module, images: np.ndarray, batch_size: int = 250) -> list[np.ndarray]:
    """Per block, (n_images, n_units): each unit's max over tokens of what `fc2` reads."""
    blocks = list(model.blocks)
    per_block: list[list[torch.Tensor]] = [[] for _ in blocks]

    def recorder(index: int):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            per_block[index].append(inputs[0].amax(dim=1))  # (B, tokens, units) -> (B, units)

        return hook

    handles = [block.mlp.fc2.register_forward_pre_hook(recorder(i)) for i, block in enumerate(blocks)]
    try:
        spec = embedded_input_spec()
        model.eval()
        for start in range(0, images.shape[0], batch_size):
            model(normalize_images(images[start : start + batch_size], spec))
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(chunks).numpy() for chunks in per_block]


def _top_label_stats(top_labels: np.ndarray, n_values: int) -> tuple[np.ndarray, np.ndarray]:
    """Entropy (bits) and majority share of each row of labels (units, top_n)."""
    counts = np.stack([np.bincount(row, minlength=n_values) for row in top_labels])  # (units, n_values)
    share = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(share > 0, share * np.log2(share), 0.0).sum(axis=1)
    return entropy, share.max(axis=1)


def unit_concept_stats(model: nn.Module, concept_set: ConceptSet, top_n: int = 20) -> dict:
    """Ground-truth concept / class statistics of each unit's top-`top_n` images, per block.

    Returns `{"blocks": [per-block dict], "top_n": top_n}`; each per-block dict holds the
    per-unit arrays `concept_entropy`, `concept_purity`, `n_concepts`, `class_purity`,
    `shape_purity`, `colour_purity` and their summaries `mean_concept_entropy`,
    `median_concept_entropy`, `mean_concept_purity`, `share_units_ge3_concepts`,
    `mean_class_purity`, `mean_shape_purity`, `mean_colour_purity`.
    """
    if len(concept_set) < top_n:
        raise ValueError(f"need at least top_n={top_n} images, got {len(concept_set)}")
    activations = image_unit_activations(model, concept_set.images)
    blocks = []
    for acts in activations:
        # top-n images per unit, highest first; a stable sort keeps ties deterministic
        top = np.argsort(-acts, axis=0, kind="stable")[:top_n].T  # (units, top_n)
        top_concepts = concept_set.concepts[top]
        concept_entropy, concept_purity = _top_label_stats(top_concepts, N_CONCEPTS)
        _, class_purity = _top_label_stats(concept_set.labels[top], N_CLASSES)
        # which factor a unit's concept mix shares: a pure colour with mixed shapes is a colour detector
        _, shape_purity = _top_label_stats(concept_set.factors["shape"][top], len(SHAPES))
        _, colour_purity = _top_label_stats(concept_set.factors["colour"][top], len(COLOURS))
        n_concepts = np.array([np.unique(row).size for row in top_concepts])
        blocks.append(
            {
                "concept_entropy": concept_entropy,
                "concept_purity": concept_purity,
                "n_concepts": n_concepts,
                "class_purity": class_purity,
                "shape_purity": shape_purity,
                "colour_purity": colour_purity,
                "mean_concept_entropy": float(concept_entropy.mean()),
                "median_concept_entropy": float(np.median(concept_entropy)),
                "mean_concept_purity": float(concept_purity.mean()),
                "share_units_ge3_concepts": float((n_concepts >= 3).mean()),
                "mean_class_purity": float(class_purity.mean()),
                "mean_shape_purity": float(shape_purity.mean()),
                "mean_colour_purity": float(colour_purity.mean()),
            }
        )
    return {"blocks": blocks, "top_n": top_n}


def format_table(stats: dict) -> str:
    """One row per block, summaries only."""
    header = (
        f"{'block':>5} {'units':>5} {'conc.entropy mean':>17} {'median':>7} {'conc.purity':>11} "
        f"{'>=3 concepts':>12} {'class purity':>12} {'shape pur.':>10} {'colour pur.':>11}"
    )
    lines = [f"top-{stats['top_n']} images per unit; concept entropy in bits (max {np.log2(N_CONCEPTS):.0f})", header]
    for index, block in enumerate(stats["blocks"]):
        lines.append(
            f"{index:>5} {block['concept_entropy'].size:>5} {block['mean_concept_entropy']:>17.3f} "
            f"{block['median_concept_entropy']:>7.3f} {block['mean_concept_purity']:>11.3f} "
            f"{block['share_units_ge3_concepts']:>12.3f} {block['mean_class_purity']:>12.3f} "
            f"{block['mean_shape_purity']:>10.3f} {block['mean_colour_purity']:>11.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="weights (default: the embedded checkpoint)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--top-n", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = create_embedded_model(pretrained=args.checkpoint is None)
    if args.checkpoint is not None:
        load_checkpoint_into(model, args.checkpoint)
    data = load_split(args.split)
    print(f"split '{args.split}': {len(data)} images, {N_CONCEPTS} concepts, {N_CLASSES} classes")
    print(format_table(unit_concept_stats(model, data, top_n=args.top_n)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
