"""ELUDe fit time vs TopK-SAE training time on the same layer's activations, same device, one run.

Both methods see the same calibration images of one MLP layer. ELUDe's cost is its router fit
(`fit_layer`: clustering the units' top-M context profiles, K chosen per unit); ELUDe is exact
(FVU 0). The SAE's cost is its training time to each held-out FVU level (fraction of variance
unexplained on 5% of the tokens, checked every `--sae-check-every` steps), with as many latents
as ELUDe produced sub-units and TopK k=32. The forward passes that collect activations are
timed separately: each method needs one.

Budget rules (printed with the table): the SAE trains until its held-out FVU reaches
`--target-fvu` (default 0.05) or its wall-clock budget `--sae-max-seconds` runs out (checked at
each FVU check). SAE times exclude the held-out FVU checks themselves (their measured cost is
subtracted), so frequent checks do not slow the SAE down on paper. A level the SAE did not
reach before its budget ran out is reported as a bound (">="), never as a ratio; levels finer
than the target are not trained for.

The default is a ViT-B-sized layer (timm `vit_base_patch16_224`, random init since nothing
can be downloaded here: 3072 units, d=768) at 112 px on 512 embedded concept images, one
CPU thread for everything.

    python benchmarks/bench_fit_vs_sae.py                                   # ViT-B layer, auto device
    python benchmarks/bench_fit_vs_sae.py --model embedded --layer blocks.2.mlp --images 2000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elude_export.data.sources import open_source  # noqa: E402
from elude_export.evidence.baselines.sae_model import (  # noqa: E402
    SAEConfig, SAEHistory, TopKSAE, collect_hidden_tokens, fvu, train_sae,
)
from elude_export.fitting.calibrate import collect_activations  # noqa: E402
from elude_export.fitting.fit import FitConfig  # noqa: E402
from elude_export.fitting.routers import fit_layer  # noqa: E402
from elude_export.layers import find_layers  # noqa: E402
from elude_export.models import load_model, resolve_device  # noqa: E402

T = TypeVar("T")
TARGET_RATIO = 20.0  # issue 9: ELUDe router fit >= 20x faster than the SAE to FVU <= 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=112, help="timm models only")
    parser.add_argument("--layer", default="blocks.6.mlp")
    parser.add_argument("--data", default="embedded:calib")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32, help="forward-pass batch")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k-max", type=int, default=4)
    parser.add_argument("--top-m", type=int, default=256)
    parser.add_argument("--target-fvu", type=float, default=0.05, help="SAE stops once held-out FVU is this low")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.2, 0.1, 0.05, 0.02],
                        help="report the SAE's time to each of these held-out FVU levels")
    parser.add_argument("--sae-k", type=int, default=32)
    parser.add_argument("--sae-batch", type=int, default=256, help="tokens per SAE step")
    parser.add_argument("--sae-lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--sae-check-every", type=int, default=5, help="steps between held-out FVU checks")
    parser.add_argument("--sae-max-seconds", type=float, default=1200.0, help="SAE wall-clock budget")
    parser.add_argument("--sae-max-steps", type=int, default=1_000_000, help="step cap (the time budget binds first)")
    parser.add_argument("--sae-tokens", type=int, default=50_000, help="at most this many tokens of h")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[..., T], *args, **kwargs) -> tuple[T, float]:
    synchronize(device)
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    synchronize(device)
    return out, time.perf_counter() - started


def check_seconds(sae: TopKSAE, h: torch.Tensor, device: torch.device, repeats: int = 3) -> float:
    """Median cost of one held-out FVU check (train_sae holds out max(10, T // 20) tokens)."""
    held = h[: max(10, h.shape[0] // 20)].to(device).float()
    costs = sorted(timed(device, fvu, sae, held)[1] for _ in range(repeats))
    return costs[len(costs) // 2]


@dataclass
class LevelRow:
    level: float
    steps: int | None  # None: not reached
    seconds: float  # SAE training seconds to the level (checks excluded); a lower bound when not reached
    ratio: float  # seconds / ELUDe fit seconds; a lower bound when not reached
    status: str  # "reached", "bound" (budget ran out first) or "beyond target" (not trained for)


def level_rows(history: SAEHistory, levels: list[float], target_fvu: float, fit_seconds: float,
               seconds_per_check: float) -> list[LevelRow]:
    """Time to each FVU level, from the history's checks; training time excludes the checks' own cost."""
    training = [max(0.0, elapsed - (i + 1) * seconds_per_check) for i, elapsed in enumerate(history.elapsed)]
    last = training[-1] if training else 0.0
    rows = []
    for level in sorted(levels, reverse=True):
        hit = next((i for i, (_step, value) in enumerate(history.fvu) if value <= level), None)
        if hit is not None:
            seconds = training[hit]
            rows.append(LevelRow(level, history.fvu[hit][0], seconds, seconds / max(fit_seconds, 1e-9), "reached"))
        else:
            status = "beyond target" if level < target_fvu else "bound"
            rows.append(LevelRow(level, None, last, last / max(fit_seconds, 1e-9), status))
    return rows


def format_rows(rows: list[LevelRow], history: SAEHistory) -> list[str]:
    lines = ["| SAE held-out FVU level | SAE steps | SAE seconds | SAE / ELUDe router fit |", "|---|---|---|---|"]
    for row in rows:
        if row.status == "reached":
            lines.append(f"| <= {row.level} | {row.steps} | {row.seconds:.1f} | {row.ratio:.1f}x |")
        elif row.status == "bound":
            lines.append(f"| <= {row.level} | not reached in {history.steps} | >= {row.seconds:.1f} (cut short) | "
                         f">= {row.ratio:.1f}x (bound, SAE cut short) |")
        else:
            lines.append(f"| <= {row.level} | not trained for (stops at target) | - | - |")
    return lines


def verdict(rows: list[LevelRow], level: float) -> str:
    """The headline comparison at `level`: a ratio if the SAE got there, a bound if it was cut short."""
    row = next((r for r in rows if r.level == level), None)
    if row is None or row.status == "beyond target":
        return f"SAE time to FVU <= {level}: not measured (not among the trained levels)"
    if row.status == "bound":
        met = "met" if row.ratio >= TARGET_RATIO else "undecided, the bound is below it"
        return (f"SAE time to FVU <= {level} / ELUDe router fit >= {row.ratio:.1f}x: a bound, the SAE was cut short "
                f"by its budget before reaching {level} (target >= {TARGET_RATIO:.0f}x: {met})")
    met = "met" if row.ratio >= TARGET_RATIO else "not met"
    return f"SAE time to FVU <= {level} / ELUDe router fit = {row.ratio:.1f}x (target >= {TARGET_RATIO:.0f}x: {met})"


def stop_reason(history: SAEHistory, config: SAEConfig) -> str:
    if history.reached_target:
        return f"reached target FVU {config.target_fvu}"
    if history.steps >= config.steps:
        return f"hit the step cap {config.steps} (cut short)"
    return f"time budget {config.max_seconds:.0f}s ran out (cut short)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    load_start = os.getloadavg()
    kwargs = {"img_size": args.img_size} if not args.model.startswith("embedded") else None
    loaded = load_model(args.model, model_kwargs=kwargs)
    model = loaded.model.to(device)
    (layer,) = find_layers(model, [args.layer])
    source = open_source(args.data)
    config = FitConfig(k_max=args.k_max, top_m=args.top_m, batch_size=args.batch_size)

    acts, calibrate_s = timed(device, collect_activations, model, [layer], source, loaded.input_spec, config.router,
                              config.top_m, config.per_image_cap, config.batch_size, device, args.images)
    # warm-up (cheap settings) so one-off kernel/allocator setup is not billed to the timed fit
    fit_layer(layer, acts[layer.path], FitConfig(k_max=2, top_m=args.top_m, unit_chunk=8, n_init=1, n_iter=2), device)
    layer_plan, fit_s = timed(device, fit_layer, layer, acts[layer.path], config, device)
    with torch.no_grad():  # a forward pass for tokens only, whatever the collector's own decorators
        tokens, tokens_s = timed(device, collect_hidden_tokens, model, [layer], source, loaded.input_spec,
                                 args.sae_tokens, args.batch_size, device, args.images)
    h = tokens[layer.path]
    n_latents = layer_plan.n_subunits
    sae_config = SAEConfig(n_latents=n_latents, k=min(args.sae_k, n_latents), steps=args.sae_max_steps,
                           batch_size=args.sae_batch, lr=args.sae_lr, target_fvu=args.target_fvu,
                           max_seconds=args.sae_max_seconds, check_every=args.sae_check_every)
    sae, history = train_sae(h, sae_config, device)
    per_check = check_seconds(sae, h, device)
    rows = level_rows(history, args.levels, args.target_fvu, fit_s, per_check)
    load_end = os.getloadavg()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} CPU thread(s)"
    n_held = max(10, h.shape[0] // 20)
    step_s = history.seconds / max(history.steps, 1)
    size = f" at {args.img_size} px" if kwargs else ""
    print(f"device {device} ({name}), model {args.model}{size}, layer {layer.path}: "
          f"{layer.n_units} units, d={layer.d_in}, {args.images} images")
    print(f"load average (1 min) {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    print(f"ELUDe: context router, top-M {args.top_m}, K <= {args.k_max} ({config.k_rule} rule) -> "
          f"{n_latents} sub-units ({int(layer_plan.split_units.numel())} units split); exact (FVU 0)")
    print(f"SAE: TopK, {sae_config.n_latents} latents (= ELUDe sub-units), k={sae_config.k}, "
          f"{h.shape[0] - n_held} train / {n_held} held-out tokens of h (d={h.shape[1]}), batch {args.sae_batch}, "
          f"Adam lr {args.sae_lr}")
    print(f"SAE budget: until held-out FVU <= {args.target_fvu} or {args.sae_max_seconds:.0f}s; "
          f"stopped after {history.steps} steps, {history.seconds:.1f}s: {stop_reason(history, sae_config)}, "
          f"final FVU {history.fvu[-1][1]:.4f}, dead latents {history.dead_fraction:.1%}")
    print(f"SAE held-out FVU checked every {args.sae_check_every} steps (~{args.sae_check_every * step_s:.1f}s); "
          f"each check {per_check:.2f}s, excluded from the SAE seconds below")
    print()
    print(f"forward pass for ELUDe calibration {calibrate_s:.2f}s, for SAE token collection {tokens_s:.2f}s; "
          f"ELUDe router fit {fit_s:.2f}s")
    print()
    for line in format_rows(rows, history):
        print(line)
    print()
    print(verdict(rows, 0.05))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
