"""Concept-selective steering, measured: ablate each concept's sub-units vs their units vs SAE latents.

Labels come from `embedded:calib` (the plan's own, unlabelled, fit images: their labels are
used here only to name columns), effects are measured on the held-out `embedded:test` (all
125 images per concept by default). See `elude_export/evidence/selectivity.py` for the
definitions. `elude steer --evaluate` is the same measurement, faster by default (32 images
per concept, no SAE).

    python benchmarks/bench_selective_steering.py --plan plan.safetensors --json-out sel.json   # every layer
    python benchmarks/bench_selective_steering.py --plan plan.safetensors --layers blocks.3.mlp --sae-steps 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _evidence_args import add_run_arguments  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", required=True, type=Path)
    parser.add_argument("--layers", nargs="+", default=["all"], help="plan layers, or 'all'")
    parser.add_argument("--per-concept", type=int, default=None, help="test images per concept (default: all)")
    parser.add_argument("--label-data", default="embedded:calib")
    parser.add_argument("--data", default="embedded:test")
    parser.add_argument("--min-share", type=float, default=0.5, help="label share a column needs to be picked")
    parser.add_argument("--sae-steps", type=int, default=1000, help="0: no SAE rows")
    parser.add_argument("--sae-k", type=int, default=32)
    add_run_arguments(parser, batch_size=256)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from elude_export.artifacts import write_json_atomic
    from elude_export.data.sources import open_source
    from elude_export.evidence.baselines.sae_model import SAEConfig
    from elude_export.evidence.labels import compute_labels
    from elude_export.evidence.selectivity import concept_selectivity
    from elude_export.models import load_model, resolve_device
    from elude_export.plan import load_plan

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    plan = load_plan(args.plan)
    loaded = load_model(plan.model_name)
    device = resolve_device(args.device)
    layers = [layer.path for layer in plan.layers] if args.layers == ["all"] else args.layers
    label_source, eval_source = open_source(args.label_data), open_source(args.data)
    labels = compute_labels(loaded, plan, label_source, args.top_n, layers, device=device)
    result = concept_selectivity(loaded, plan, labels.labels, eval_source, layers, args.min_share, args.per_concept,
                                 label_source, SAEConfig(n_latents=1, k=args.sae_k, steps=args.sae_steps, batch_size=512)
                                 if args.sae_steps > 0 else None, args.top_n, args.batch_size, device,
                                 label_source.name, log=lambda m: print(m, file=sys.stderr))
    print(result.table())
    print(f"\n{time.perf_counter() - started:.0f}s on {device} ({args.threads} thread(s))")
    if args.json_out is not None:
        write_json_atomic(args.json_out, result.to_json())


if __name__ == "__main__":
    main()
