"""One prepared GPU check (about 8 minutes at most): fit, fused equality and ORT on CUDA.

Prints one short table:
- a CUDA fit of ViT-B/16 (random init: nothing is downloaded; 12 layers, 224 px) on as many
  random images as the time budget allows (`--images`, shrunk when a calibration probe says
  they would not fit), with each phase's time and peak CUDA memory;
- fused equality on CUDA: the rewritten model (`elude_export.rewrite.apply_plan`, all steers
  at 1) against the original CUDA model, bitwise, on held-out images;
- when onnxruntime-gpu is importable: export, validation under the CUDA execution provider,
  and the latency of the ELUDe graph over the original model's graph.

Without CUDA it prints a message and exits 0, so it can run from any tree:

    PYTHONPATH=$PWD python3 benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--images", type=int, default=5000, help="calibration images at most")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--check-images", type=int, default=256)
    return parser.parse_args(argv)


def _images(count: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def _sync() -> None:
    torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing to check (run it on a GPU machine)")
        return 0
    from elude_export.data.sources import ArraySource
    from elude_export.fitting.calibrate import collect_activations
    from elude_export.fitting.fit import FitConfig, fit
    from elude_export.layers import find_layers
    from elude_export.models import load_model, model_batches
    from elude_export.rewrite import apply_plan

    started = time.perf_counter()
    device = torch.device("cuda")
    loaded = load_model(args.model)
    spec = loaded.input_spec
    model = loaded.model.eval().to(device)
    rows: list[tuple[str, str]] = [("device", torch.cuda.get_device_name(device))]

    # probe: how many calibration images fit in ~40% of the budget (the fit is ~2 forwards + clustering)
    probe = ArraySource("probe", 256, images=_images(256, spec.height, 1))
    _sync()
    probe_started = time.perf_counter()
    collect_activations(model, find_layers(model), probe, spec, batch_size=args.batch_size, device=device)
    _sync()
    per_image = (time.perf_counter() - probe_started) / 256
    count = int(min(args.images, max(512, 0.4 * args.budget / max(per_image, 1e-6) / 2)))
    rows.append(("calibration probe", f"{1000 * per_image:.2f} ms/image -> {count} images"))

    source = ArraySource("random", count, images=_images(count, spec.height, 0))
    config = FitConfig(batch_size=args.batch_size, stats_images=min(count, 4096))
    report = fit(loaded, source, config, device)
    for phase, seconds in report.seconds.items():
        rows.append((f"fit: {phase}", f"{seconds:.1f}s"))
    rows.append(("fit: sub-units / peak CUDA", f"{report.plan.n_subunits} / {report.peak_memory_mb.get('cuda', 0):.0f} MB"))
    cluster_ratio = report.seconds["cluster"] / report.seconds["calibrate"]
    rows.append(("router fit / calibration forward", f"{cluster_ratio:.2f}x (target <= 0.5x)"))

    held_out = ArraySource("held-out", args.check_images, images=_images(args.check_images, spec.height, 2))
    rewritten = apply_plan(model, report.plan).to(device).eval()
    equal = total = 0
    with torch.no_grad():
        for _, batch in model_batches(held_out, spec, 64, device, torch.float32):
            same = (model(batch) == rewritten(batch)).flatten(1).all(-1)
            equal, total = equal + int(same.sum()), total + len(same)
    rows.append(("fused equality on CUDA (bitwise)", f"{equal}/{total} images {'OK' if equal == total else 'FAILED'}"))

    rows.extend(_ort_rows(loaded, report.plan, held_out))
    rows.append(("total", f"{time.perf_counter() - started:.1f}s"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0 if equal == total else 1


def _ort_rows(loaded, plan, held_out) -> list[tuple[str, str]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return [("onnxruntime", "not importable: skipped")]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return [("onnxruntime CUDA", "onnxruntime-gpu not installed: skipped")]
    from elude_export.export.onnx_export import export_onnx, export_reference_onnx
    from elude_export.export.ort_session import open_session
    from elude_export.export.validate import validate_export

    rows = []
    with tempfile.TemporaryDirectory() as work:
        path = export_onnx(loaded, plan, Path(work) / "elude.onnx", taps="all:max", steer=True)
        report = validate_export(loaded, plan, path, held_out, provider="cuda", n_images=64)
        rows.append(("ORT CUDA validation", "OK" if report.ok else "FAILED: " + "; ".join(report.lines()[-3:])))
        reference = export_reference_onnx(loaded, Path(work) / "reference.onnx")
        latency = {}
        batch = np.random.default_rng(3).standard_normal((32, 3, loaded.input_spec.height,
                                                          loaded.input_spec.width)).astype(np.float32)
        for name, onnx_path in (("elude", path), ("reference", reference)):
            session = open_session(onnx_path, provider="cuda")
            feed = {"input": batch}
            for _ in range(3):
                session.run(None, feed)
            timed = time.perf_counter()
            for _ in range(10):
                session.run(None, feed)
            latency[name] = (time.perf_counter() - timed) / 10
        rows.append(("ORT CUDA latency, batch 32", f"ELUDe {1000 * latency['elude']:.1f} ms / original "
                                                   f"{1000 * latency['reference']:.1f} ms = "
                                                   f"{latency['elude'] / latency['reference']:.2f}x"))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
