"""Token-level evidence: do the top tokens of units, sub-units (token and context router) and SAE latents
fall on the object? Object masks are the concept generator's own (`data.concepts.object_masks`).

See `elude_export/evidence/masks.py` for the definition. The SAEs train on the plan's fit data.

    python benchmarks/bench_mask_share.py --plan plan.safetensors --token-plan plan-token.safetensors
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
    parser.add_argument("--plan", required=True, type=Path, help="a context-router plan")
    parser.add_argument("--token-plan", type=Path, default=None, help="a token-router plan of the same model")
    parser.add_argument("--layers", nargs="+", default=None, help="default: every layer of the plan")
    parser.add_argument("--data", default="embedded:test")
    parser.add_argument("--fit-data", default="embedded:calib", help="SAE training images")
    parser.add_argument("--top-tokens", type=int, default=4)
    parser.add_argument("--sae-steps", type=int, default=1000, help="0: no SAE rows")
    add_run_arguments(parser, batch_size=64)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from elude_export.artifacts import write_json_atomic
    from elude_export.data.sources import open_source
    from elude_export.evidence.baselines.sae_model import SAEConfig, train_layer_saes
    from elude_export.evidence.masks import format_rows, rows_json, token_mask_evidence
    from elude_export.layers import find_layers
    from elude_export.models import load_model, resolve_device
    from elude_export.plan import load_plan

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    plans = {"context": load_plan(args.plan)}
    if args.token_plan is not None:
        plans["token"] = load_plan(args.token_plan)
    plan = plans["context"]
    loaded = load_model(plan.model_name)
    device = resolve_device(args.device)
    layers = args.layers or [layer.path for layer in plan.layers]
    saes = {}
    if args.sae_steps > 0:
        saes = train_layer_saes(loaded.model.eval().to(device), find_layers(loaded.model, layers),
                                {p: plan.layer(p).n_subunits for p in layers}, open_source(args.fit_data),
                                loaded.input_spec, SAEConfig(n_latents=1, steps=args.sae_steps, batch_size=512),
                                args.batch_size, device, log=lambda m: print(m, file=sys.stderr))
    rows = token_mask_evidence(loaded, plans, open_source(args.data), saes, layers, args.top_n, args.top_tokens,
                               args.batch_size, device)
    print(format_rows(rows, args.top_n, args.top_tokens))
    print(f"\n{time.perf_counter() - started:.0f}s on {device} ({args.threads} thread(s))")
    if args.json_out is not None:
        write_json_atomic(args.json_out, rows_json(rows))


if __name__ == "__main__":
    main()
