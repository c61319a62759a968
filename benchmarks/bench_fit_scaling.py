"""Fit time and peak memory vs the number of calibration images (a scaling curve).

Every point runs in a fresh subprocess so its peak memory is its own: on CPU the peak
resident set size (ru_maxrss) above the process's size after loading the model and data,
on CUDA `torch.cuda.max_memory_allocated`. Fit stages are timed separately (calibration is
one streaming forward pass with bounded buffers; clustering depends on top-M, not on N;
statistics is a second pass over at most `stats_images`).

    python benchmarks/bench_fit_scaling.py                                  # embedded model, 250..2000
    python benchmarks/bench_fit_scaling.py --model vit_base_patch16_224 --img-size 112 \
        --layers blocks.6.mlp --sizes 128 256 512 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--img-size", type=int, default=None, help="timm models only")
    parser.add_argument("--data", default="embedded:calib")
    parser.add_argument("--layers", nargs="*", default=None, help="default: every neuron layer")
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--router", default="context", choices=("context", "token"))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(args: argparse.Namespace) -> dict:
    """One fit on `args.worker` images; returns timings and peak memory."""
    from elude_export.models import resolve_device
    from elude_export.fitting.fit import FitConfig, fit
    from elude_export.models import load_model
    from elude_export.data.sources import open_source

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    kwargs = {"img_size": args.img_size} if args.img_size else None
    loaded = load_model(args.model, model_kwargs=kwargs)
    loaded.model.to(device)
    source = open_source(args.data)
    source.load(source.batches(1).__next__()[0])  # materialise lazily generated data before the baseline
    baseline = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = FitConfig(router=args.router, limit=args.worker, layers=args.layers, stats_images=args.worker)
    started = time.perf_counter()
    report = fit(loaded, source, config, device)
    total = time.perf_counter() - started
    out = {"images": report.n_images, "seconds": report.seconds, "total_s": total,
           "subunits": report.plan.n_subunits, "peak_rss_mb": _rss_mb(), "rss_above_baseline_mb": _rss_mb() - baseline}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    out["device"] = str(device)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return 0
    rows = []
    for size in args.sizes:
        command = [sys.executable, __file__, "--worker", str(size), "--model", args.model, "--data", args.data,
                   "--router", args.router, "--device", args.device, "--threads", str(args.threads)]
        if args.img_size:
            command += ["--img-size", str(args.img_size)]
        if args.layers:
            command += ["--layers", *args.layers]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    device = rows[0]["device"] if rows else args.device
    print(f"model {args.model}, router {args.router}, layers {args.layers or 'all'}, device {device}, "
          f"{args.threads} thread(s)")
    print("| images | calibrate s | cluster s | statistics s | total s | s / 1k images | peak RSS MB | "
          "RSS above baseline MB | peak CUDA MB | sub-units |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        s = row["seconds"]
        cuda = f"{row['peak_cuda_mb']:.0f}" if "peak_cuda_mb" in row else "-"
        print(f"| {row['images']} | {s['calibrate']:.2f} | {s['cluster']:.2f} | {s['statistics']:.2f} | "
              f"{row['total_s']:.2f} | {1000 * row['total_s'] / row['images']:.2f} | {row['peak_rss_mb']:.0f} | "
              f"{row['rss_above_baseline_mb']:.0f} | {cuda} | {row['subunits']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
