"""ELUDe fit time vs TopK-SAE training time on the same layer's activations, same device, one run.

Both methods see the same calibration images of one MLP layer. ELUDe's cost is its router fit
(batched spherical k-means over the units' top-M context profiles, K chosen per unit); the
SAE's cost is training to a stated reconstruction level (held-out fraction of variance
unexplained, `--target-fvu`) with as many latents as ELUDe produced sub-units. The forward
passes that collect activations are timed separately: each method needs one.

The default is a ViT-B-sized layer (timm `vit_base_patch16_224`, random init since nothing
can be downloaded here: 3072 units, d=768) at 112 px on the embedded concept images. Where
the SAE cannot reach the target within `--sae-max-seconds`, the ratio is a lower bound (">").

    python benchmarks/bench_fit_vs_sae.py                                   # ViT-B layer, auto device
    python benchmarks/bench_fit_vs_sae.py --model embedded --layer blocks.2.mlp --images 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elude_export.fitting.calibrate import collect_activations  # noqa: E402
from elude_export.models import resolve_device  # noqa: E402
from elude_export.fitting.fit import FitConfig  # noqa: E402
from elude_export.fitting.routers import fit_layer  # noqa: E402
from elude_export.layers import find_layers  # noqa: E402
from elude_export.models import load_model  # noqa: E402
from elude_export.evidence.baselines.sae_model import SAEConfig, collect_hidden_tokens, train_sae  # noqa: E402
from elude_export.data.sources import open_source  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=112, help="timm models only")
    parser.add_argument("--layer", default="blocks.6.mlp")
    parser.add_argument("--data", default="embedded:calib")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k-max", type=int, default=4)
    parser.add_argument("--top-m", type=int, default=256)
    parser.add_argument("--target-fvu", type=float, default=0.01, help="SAE reconstruction level to reach (stop)")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.2, 0.1, 0.05, 0.02, 0.01],
                        help="also report the time to each of these held-out FVU levels")
    parser.add_argument("--sae-k", type=int, default=32)
    parser.add_argument("--sae-batch", type=int, default=1024)
    parser.add_argument("--sae-max-steps", type=int, default=20000)
    parser.add_argument("--sae-max-seconds", type=float, default=600.0)
    parser.add_argument("--sae-tokens", type=int, default=50_000)
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args, **kwargs):
    synchronize(device)
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    synchronize(device)
    return out, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    kwargs = {"img_size": args.img_size} if args.model != "embedded" and not args.model.startswith("embedded") else None
    loaded = load_model(args.model, model_kwargs=kwargs)
    model = loaded.model.to(device)
    (layer,) = find_layers(model, [args.layer])
    source = open_source(args.data)
    config = FitConfig(k_max=args.k_max, top_m=args.top_m, batch_size=args.batch_size)

    acts, calibrate_s = timed(device, collect_activations, model, [layer], source, loaded.input_spec, config.router,
                              config.top_m, config.per_image_cap, config.batch_size, device, args.images)
    # warm-up on a few units so one-off kernel/allocator setup is not billed to either method
    fit_layer(layer, acts[layer.path], FitConfig(k_max=2, top_m=args.top_m, unit_chunk=8, n_init=1, n_iter=2), device)
    layer_plan, fit_s = timed(device, fit_layer, layer, acts[layer.path], config, device)
    tokens, tokens_s = timed(device, collect_hidden_tokens, model, [layer], source, loaded.input_spec,
                             args.sae_tokens, args.batch_size, device, args.images)
    h = tokens[layer.path]
    sae_config = SAEConfig(n_latents=layer_plan.n_subunits, k=min(args.sae_k, layer_plan.n_subunits),
                           steps=args.sae_max_steps, batch_size=args.sae_batch, target_fvu=args.target_fvu,
                           max_seconds=args.sae_max_seconds, check_every=50)
    _sae, history = train_sae(h, sae_config, device)
    final_fvu = history.fvu[-1][1]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} CPU thread(s)"
    print(f"device {device} ({name}), model {args.model}, layer {layer.path}: {layer.n_units} units, "
          f"d={layer.d_in}, {args.images} images")
    print(f"ELUDe: context router, top-M {args.top_m}, K <= {args.k_max} ({config.k_rule} rule) -> "
          f"{layer_plan.n_subunits} sub-units ({int(layer_plan.split_units.numel())} units split); exact (FVU 0)")
    print(f"SAE: TopK, {sae_config.n_latents} latents, k={sae_config.k}, batch {args.sae_batch}, "
          f"{h.shape[0]} tokens, held-out FVU checked every {sae_config.check_every} steps "
          f"(stopped at FVU {final_fvu:.4f} after {history.steps} steps, {history.seconds:.1f}s)")
    print()
    print(f"forward pass for ELUDe calibration {calibrate_s:.2f}s, for SAE token collection {tokens_s:.2f}s; "
          f"ELUDe router fit {fit_s:.2f}s")
    print()
    print("| SAE held-out FVU level | SAE steps | SAE seconds | SAE / ELUDe fit time |")
    print("|---|---|---|---|")
    for level in sorted(args.levels, reverse=True):
        hit = next(((step, seconds) for (step, value), seconds in zip(history.fvu, history.elapsed)
                    if value <= level), None)
        if hit is None:
            print(f"| <= {level} | not reached in {history.steps} | > {history.seconds:.1f} | "
                  f"> {history.seconds / max(fit_s, 1e-9):.1f}x |")
        else:
            print(f"| <= {level} | {hit[0]} | {hit[1]:.1f} | {hit[1] / max(fit_s, 1e-9):.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
