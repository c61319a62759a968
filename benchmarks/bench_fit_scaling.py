"""Router-fit cost per layer: new k-means vs the original one on the same tensors, and vs the forward.

For each configuration (units, input dim, top-M, k_max) a one-block timm ViT with random
weights is calibrated on random images (one forward pass of that block over `--images`
images: the calibration forward for that layer), then the layer's routers are fitted twice on
the *same* calibration tensors: with `elude_export.fitting.kmeans` (the library's path) and
with `benchmarks/_reference_kmeans.py` (the original implementation, kept for this benchmark
only). Each (configuration, algorithm) runs in a fresh subprocess so that its peak RSS is its
own. The original algorithm gets `--reference-budget` seconds; cut short, its time is
extrapolated from the units it finished and printed as a bound (">=").

Random weights have little cluster structure, so the gap rule rejects most units early, which
favours the new algorithm's early exit; `--k-rule fixed` (every unit to k_max, no early exit)
is the worst case for it and is reported too by default.

    python benchmarks/bench_fit_scaling.py                          # the default sweep (~30 min on 1 core)
    python benchmarks/bench_fit_scaling.py --configs 3072x768 --images 512 --k-rules gap
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_CONFIGS = ["384x768", "3072x768", "4096x768", "3072x96", "3072x1024", "3072x768:M128", "3072x768:K4"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="UNITSxDIM[:M<top-m>][:K<k-max>] (defaults: top-M 256, k_max 8)")
    parser.add_argument("--k-rules", nargs="+", default=["gap", "fixed"], choices=("gap", "fixed"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--reference-budget", type=float, default=120.0,
                        help="seconds the original algorithm may run per configuration before it is cut short")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _parse_config(text: str) -> dict:
    head, *extras = text.split(":")
    units, dim = (int(v) for v in head.split("x"))
    config = {"units": units, "dim": dim, "top_m": 256, "k_max": 8}
    for extra in extras:
        config["top_m" if extra[0] == "M" else "k_max"] = int(extra[1:])
    return config


def _one_block_vit(units: int, dim: int, img_size: int) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    heads = max(1, dim // 64)
    return VisionTransformer(img_size=img_size, patch_size=16, embed_dim=dim, depth=1, num_heads=heads,
                             mlp_ratio=units / dim, num_classes=10).eval()


def worker(spec: dict) -> dict:
    """Calibrate one block, fit its routers with one algorithm; time both, report peak RSS."""
    from elude_export.data.sources import ArraySource
    from elude_export.fitting import kmeans
    from elude_export.fitting.calibrate import collect_activations
    from elude_export.fitting.fit import FitConfig
    from elude_export.fitting.memory import peak_rss_mb
    from elude_export.fitting.chunks import auto_unit_chunk
    from elude_export.fitting.routers import _profiles
    from elude_export.layers import find_layers
    from elude_export.models import InputSpec

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model = _one_block_vit(spec["units"], spec["dim"], spec["img_size"]).to(device)
    images = np.random.default_rng(0).integers(0, 256, (spec["images"], spec["img_size"], spec["img_size"], 3),
                                               dtype=np.uint8)
    source = ArraySource("random", len(images), images=images)
    input_spec = InputSpec(3, spec["img_size"], spec["img_size"], (0.5,) * 3, (0.5,) * 3)
    layers = find_layers(model, ["blocks.0.mlp"])
    started = time.perf_counter()
    acts = collect_activations(model, layers, source, input_spec, top_m=spec["top_m"], batch_size=32, device=device)
    forward_s = time.perf_counter() - started
    config = FitConfig(top_m=spec["top_m"], k_max=spec["k_max"], k_rule=spec["k_rule"])
    if spec["algorithm"] == "reference":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import _reference_kmeans as algorithm
    else:
        algorithm = kmeans
    weights = layers[0].unit_weights().float()
    started, done, ks = time.perf_counter(), 0, []
    # the original ran 512 units per call; the library picks its own (cache-sized on CPU)
    chunk = 512 if spec["algorithm"] == "reference" else auto_unit_chunk(config.top_m, device)
    for start in range(0, spec["units"], chunk):
        units = slice(start, min(start + chunk, spec["units"]))
        chosen = algorithm.select_k(_profiles(acts[layers[0].path], weights, units, device), config.k_max,
                                    config.k_rule, config.min_gain, config.min_cluster_frac, config.n_iter,
                                    config.n_init, config.seed + start)
        ks.append(chosen.k.cpu())
        done = units.stop
        if time.perf_counter() - started > spec["budget"]:
            break
    fit_s = time.perf_counter() - started
    k = torch.cat(ks)
    return {"forward_s": forward_s, "fit_s": fit_s, "units_done": done, "peak_rss_mb": peak_rss_mb(),
            "split": int((k > 1).sum()), "mean_k": float(k.float().mean())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    print(f"device {args.device}, {args.threads} torch thread(s), {args.images} random images at {args.img_size} px, "
          f"one-block random-init timm ViT per row; reference budget {args.reference_budget:.0f}s")
    print("| units | d | M | k_max | rule | forward s | new fit s | new/forward | reference fit s | "
          "reference/new | new peak RSS MB | ref peak RSS MB | units split new / ref (of done) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for text in args.configs:
        for rule in args.k_rules:
            rows = {}
            for algorithm, budget in (("new", float("inf")), ("reference", args.reference_budget)):
                spec = {**_parse_config(text), "k_rule": rule, "algorithm": algorithm, "budget": budget,
                        "images": args.images, "img_size": args.img_size, "threads": args.threads,
                        "device": args.device}
                done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                                      capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    return done.returncode
                rows[algorithm] = json.loads(done.stdout.strip().splitlines()[-1])
            new, ref, c = rows["new"], rows["reference"], _parse_config(text)
            cut = ref["units_done"] < c["units"]
            ref_s = ref["fit_s"] * c["units"] / ref["units_done"]
            ref_text = f">= {ref_s:.1f} (cut after {ref['units_done']} units)" if cut else f"{ref_s:.1f}"
            ratio = f"{'>= ' if cut else ''}{ref_s / new['fit_s']:.1f}x"
            print(f"| {c['units']} | {c['dim']} | {c['top_m']} | {c['k_max']} | {rule} | {new['forward_s']:.1f} | "
                  f"{new['fit_s']:.1f} | {new['fit_s'] / new['forward_s']:.2f}x | {ref_text} | {ratio} | "
                  f"{new['peak_rss_mb']:.0f} | {ref['peak_rss_mb']:.0f} | {new['split']} / {ref['split']} "
                  f"(of {ref['units_done']}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
