"""onnxruntime cost of the disentangled graph, as ratios to the original graph timed in the same run.

    python benchmarks/bench_onnx.py                       # embedded model + vit_base_patch16_224
    python benchmarks/bench_onnx.py --models embedded --repeats 5 --threads 2

For each model: fit a plan (embedded: the committed checkpoint and its calibration split when
present; timm models: random weights, K=2 fixed rule, fitted on random images), export the
original model and several disentangled variants with the same exporter, then time them in
interleaved rounds (variant order rotates each round) so that a shared, noisy CPU affects all
variants alike. Reports the median latency at batch 1 and throughput at the large batch, each
as a ratio to the original graph. Not a test: prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Variant:
    label: str
    taps: str  # "one", "all" or "none"
    mode: str = "fused"
    low_rank: bool = False
    steer: bool = False


VARIANTS = [
    Variant("taps 1 layer (max)", "one"),
    Variant("taps all layers (max)", "all"),
    Variant("taps all layers (max,mean,cls)", "all3"),
    Variant("taps all + steerable", "all", steer=True),
    Variant("taps all, low-rank router", "all", low_rank=True),
    Variant("taps 1 layer, explicit", "one", mode="explicit"),
    Variant("taps all, explicit", "all", mode="explicit"),
]


def load_and_fit(name: str, n_images: int, router: str, log) -> tuple:
    """(loaded model, plan): the embedded model as shipped, or a random-weight timm model."""
    from elude_export.fitting.fit import FitConfig, fit
    from elude_export.models import EMBEDDED_WEIGHTS, LoadedModel, create_embedded_model, embedded_input_spec, load_model
    from elude_export.data.sources import ArraySource, open_source

    torch.manual_seed(0)
    if name == "embedded" and EMBEDDED_WEIGHTS.is_file():
        loaded = load_model("embedded")
        source = open_source("embedded:calib").subset(np.arange(n_images))
        config = FitConfig(router=router, k_max=4, router_rank=32, stats_images=n_images)
    else:
        if name == "embedded":
            loaded = LoadedModel(create_embedded_model(pretrained=False), "embedded", embedded_input_spec(), 4)
        else:
            loaded = load_model(name)
        spec = loaded.input_spec
        images = np.random.default_rng(0).integers(0, 256, (n_images, spec.height, spec.width, 3), dtype=np.uint8)
        source = ArraySource("random", n_images, images=images)
        config = FitConfig(router=router, top_m=min(64, n_images // 2), k_rule="fixed", k_max=2, router_rank=64,
                           stats_images=min(n_images, 16), batch_size=16)
    started = time.perf_counter()
    plan = fit(loaded, source, config).plan
    log(f"{name}: fitted {plan.n_subunits} sub-units over {len(plan.layers)} layers in "
        f"{time.perf_counter() - started:.0f}s ({router} router)")
    return loaded, plan


def export_variants(loaded, plan, variants: list[Variant], folder: Path, log) -> dict[str, Path]:
    from elude_export.export.onnx_export import export_onnx, export_reference_onnx
    from elude_export.export.options import ExportOptions

    middle = plan.layers[len(plan.layers) // 2].path
    paths = {"original": export_reference_onnx(loaded, folder / "original.onnx")}
    for number, variant in enumerate(variants):
        taps = {"one": f"{middle}:max", "all": "all:max", "all3": "all:max,mean,cls"}[variant.taps]
        started = time.perf_counter()
        paths[variant.label] = export_onnx(loaded, plan, folder / f"variant{number}.onnx", taps=taps,
                                           steer=variant.steer,
                                           options=ExportOptions(mode=variant.mode, low_rank=variant.low_rank))
        log(f"  exported '{variant.label}' in {time.perf_counter() - started:.0f}s")
    return paths


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # steer initializers that are also inputs warn by design
    # no per-session arena: eight ViT-B sessions each keeping a batch-32 arena exhaust 24 GB;
    # every variant allocates the same way, so ratios are unaffected
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_sessions(sessions: dict, batch: np.ndarray, rounds: int, runs: int) -> dict[str, float]:
    """Median seconds per run, interleaving variants round by round (order rotated each round)."""
    names = list(sessions)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: first runs allocate and pick kernels
        sessions[name].run(None, {"input": batch})
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            for _ in range(runs):
                sessions[name].run(None, {"input": batch})
            samples[name].append((time.perf_counter() - started) / runs)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_model(name: str, args, log) -> list[str]:
    loaded, plan = load_and_fit(name, args.fit_images, args.router, log)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_variants(loaded, plan, VARIANTS, Path(tmp), log)
        sessions = {label: session(path, args.threads) for label, path in paths.items()}
        spec = loaded.input_spec
        results = {}
        large = args.large_batch if name == "embedded" else args.vit_batch
        for batch_size, runs in ((1, args.runs), (large, max(1, args.runs // 4))):
            batch = np.random.default_rng(1).standard_normal(
                (batch_size, spec.channels, spec.height, spec.width)).astype(np.float32)
            results[batch_size] = time_sessions(sessions, batch, args.repeats, runs)
            log(f"  timed batch {batch_size}")
        base1, base_large = results[1]["original"], results[large]["original"]
        probe = np.random.default_rng(2).standard_normal((4, spec.channels, spec.height, spec.width)).astype(np.float32)
        original = sessions["original"].run(None, {"input": probe})[0]
        for label in paths:
            t1, tl = results[1][label], results[large][label]
            logits = sessions[label].run(None, {"input": probe})[0]
            rows.append(f"| {name} | {plan.router} | {label} | {t1 * 1e3:.2f} | {t1 / base1:.3f}x | "
                        f"{large / tl:.1f} (N={large}) | {tl / base_large:.3f}x | "
                        f"{float((logits == original).mean()):.3f} / {float(np.abs(logits - original).max()):.1e} |")
        del sessions
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="embedded,vit_base_patch16_224")
    parser.add_argument("--router", choices=["context", "token"], default="context")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median taken)")
    parser.add_argument("--runs", type=int, default=20, help="runs per round at batch 1 (a quarter at the large batch)")
    parser.add_argument("--large-batch", type=int, default=32)
    parser.add_argument("--vit-batch", type=int, default=32, help="large batch for timm models")
    parser.add_argument("--fit-images", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    import onnxruntime

    header = [
        f"onnxruntime {onnxruntime.__version__} CPU, {args.threads} thread(s), median of {args.repeats} interleaved rounds",
        "",
        "| model | router | graph | batch 1 ms | time vs original | batch N img/s | time vs original "
        "| logits vs original ONNX: bitwise share / max abs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows += bench_model(name, args, log)
    print("\n".join(header + rows))


if __name__ == "__main__":
    main()
