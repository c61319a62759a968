"""Bounded load test of the server on loopback vs calling the onnxruntime session directly.

    python benchmarks/bench_serving.py                      # embedded ViT export (built if needed)
    python benchmarks/bench_serving.py --model model.onnx   # any ELUDe export
    python benchmarks/bench_serving.py --fixture            # the tiny test model

Scenarios (each `--seconds` long, monitoring always on in the server):
- direct session, batch 8 and batch 1 (the baseline: `session.run` in a loop), and batch 8 from
  as many threads as the server has instances (what its instances could do without HTTP);
  each server scenario's ratio is against direct batch-8 runs right before and after it, with
  and without spinning threads, whichever was faster;
- server, v2 binary requests of 8 images (max_batch 8);
- server, v2 binary requests of 1 image from many clients, micro-batched up to 8;
- server over gRPC (`inference.GRPCInferenceService/ModelInfer`, raw tensors), requests of 8 images;
- health latency while 4 clients send JSON requests of 64 images (the event loop must stay free:
  target p99 < 20 ms);
- with `--soak-seconds N`: the server's RSS sampled every second for N s under a batch-8 mix
  (binary REST and gRPC requests of 8 images, micro-batched single images, JSON requests of 8
  images, metrics and drift scrapes), reported as first- vs last-quarter mean, slope and a verdict.
`--scenarios` picks which of throughput, health, soak run (default: throughput and health, plus
soak when `--soak-seconds` is given).
The server runs as a separate process (`python -m serving`) so that the load generator does not
share its GIL; clients are threads with keep-alive `http.client` connections sending pre-encoded
requests. Reports images/s, request latency p50/p99, errors and the server's RSS before/after.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int | None = None) -> float:
    """user+system CPU time of this process (pid None) or of another one, from /proc."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def build_embedded(out: Path, checkpoint: Path | None = None) -> tuple[Path, str]:
    """Export the embedded ViT (trained weights when bundled, else the same architecture untrained)."""
    from elude_export.fitting.fit import FitConfig, fit
    from elude_export.models import (EMBEDDED_WEIGHTS, LoadedModel, create_embedded_model, embedded_input_spec,
                                     load_model)
    from elude_export.export.onnx_export import export_onnx
    from elude_export.data.sources import open_source

    if checkpoint is not None:
        loaded, what = load_model("embedded", checkpoint=checkpoint), f"embedded ViT ({checkpoint})"
    elif EMBEDDED_WEIGHTS.is_file():
        loaded, what = load_model("embedded"), "embedded ViT (trained)"
    else:
        loaded = LoadedModel(create_embedded_model(pretrained=False), "embedded", embedded_input_spec(), 4)
        what = "embedded ViT architecture (untrained weights: same compute)"
    plan = fit(loaded, open_source("embedded:calib"), FitConfig(limit=512, top_m=128, stats_images=512)).plan
    return export_onnx(loaded, plan, out / "embedded.onnx"), what


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


def bench_direct(path: Path, x: np.ndarray, seconds: float, spinning: bool, threads: int = 0,
                 callers: int = 1) -> dict:
    """`session.run` in a loop on `callers` threads sharing one session (1: the plain way to call it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run(None, {"input": x})
    latencies: list[list[float]] = [[] for _ in range(callers)]
    deadline = time.perf_counter() + seconds

    def loop(own: list[float]) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            session.run(None, {"input": x})
            own.append(time.perf_counter() - started)

    cpu, began = cpu_seconds(), time.perf_counter()
    workers = [threading.Thread(target=loop, args=(own,)) for own in latencies]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    flat = [v for own in latencies for v in own]
    elapsed = sum(flat) if callers == 1 else time.perf_counter() - began
    return {"images": len(flat) * len(x), "elapsed": elapsed, "latencies": flat, "errors": 0,
            "cpu": cpu_seconds() - cpu}


def encode_request(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = x.astype(np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                          "Content-Type": "application/octet-stream"}


def bench_server(port: int, model: str, x: np.ndarray, clients: int, seconds: float, pid: int) -> dict:
    body, headers = encode_request(x)
    path = f"/v2/models/{model}/infer"
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(3):  # warm the connection
            connection.request("POST", path, body, headers)
            connection.getresponse().read()
        start.wait()
        while time.perf_counter() < stop_at[0]:
            started = time.perf_counter()
            connection.request("POST", path, body, headers)
            response = connection.getresponse()
            response.read()
            latencies[index].append(time.perf_counter() - started)
            if response.status != 200:
                errors[index] += 1
        connection.close()

    return _run_clients(client, clients, seconds, pid, latencies, errors, len(x), start, stop_at)


def encode_grpc_request(model: str, x: np.ndarray) -> bytes:
    """A serialised ModelInferRequest (raw input contents, logits only), encoded once like the REST body."""
    from serving.grpc_proto import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.outputs.add(name="logits")
    request.raw_input_contents.append(x.astype(np.float32).tobytes())
    return request.SerializeToString()


def bench_grpc(port: int, model: str, x: np.ndarray, clients: int, seconds: float, pid: int) -> dict:
    """Like `bench_server`, over gRPC: one channel per client, pre-serialised requests, bytes back."""
    import grpc

    body = encode_grpc_request(model, x)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(index: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
            for _ in range(3):
                call(body, timeout=30)
            start.wait()
            while time.perf_counter() < stop_at[0]:
                started = time.perf_counter()
                try:
                    call(body, timeout=30)
                except grpc.RpcError:
                    errors[index] += 1
                latencies[index].append(time.perf_counter() - started)

    return _run_clients(client, clients, seconds, pid, latencies, errors, len(x), start, stop_at)


def _run_clients(client, clients: int, seconds: float, pid: int, latencies, errors, batch: int,
                 start: threading.Barrier, stop_at: list[float]) -> dict:
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds + 60  # provisional, set for real once all are warm
    start.wait()
    began = time.perf_counter()
    server_cpu, client_cpu, warm_rss = cpu_seconds(pid), cpu_seconds(), rss_mb(pid)
    stop_at[0] = began + seconds
    for thread in threads:
        thread.join(timeout=seconds + 60)
    elapsed = time.perf_counter() - began
    flat = [v for per in latencies for v in per]
    return {"images": len(flat) * batch, "elapsed": elapsed, "latencies": flat, "errors": sum(errors),
            "cpu": cpu_seconds(pid) - server_cpu, "client_cpu": cpu_seconds() - client_cpu, "warm_rss": warm_rss}


def health_under_json_load(port: int, model: str, x64: np.ndarray, seconds: float) -> dict:
    """Health latency (ms) while 4 keep-alive clients send JSON requests of 64 images each."""
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x64.shape), "datatype": "FP32",
                                   "data": x64.ravel().tolist()}]}).encode()
    headers = {"Content-Type": "application/json"}
    stop, served, failed = threading.Event(), [0], [0]

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not stop.is_set():
            connection.request("POST", f"/v2/models/{model}/infer", body, headers)
            response = connection.getresponse()
            response.read()
            served[0] += 1
            failed[0] += response.status != 200
        connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    probe = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        probe.request("GET", "/v2/health/live")
        probe.getresponse().read()
        times.append(time.perf_counter() - started)
        time.sleep(0.01)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    return {"p50": percentile(times, 50), "p99": percentile(times, 99), "max": 1000 * max(times),
            "probes": len(times), "json_requests": served[0], "errors": failed[0]}


def soak(port: int, grpc_port: int, model: str, x8: np.ndarray, seconds: float, pid: int) -> dict:
    """Server RSS (MB) sampled each second for `seconds` under a steady batch-8 mix, REST and gRPC."""
    x1 = x8[:1].copy()
    json_body = json.dumps({"inputs": [{"name": "input", "shape": list(x8.shape), "datatype": "FP32",
                                        "data": x8.ravel().tolist()}]}).encode()
    stop, counts = threading.Event(), {"json": 0, "scrapes": 0, "errors": 0}

    def json_and_scrapes() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while not stop.is_set():
            for method, path, body in (("POST", f"/v2/models/{model}/infer", json_body), ("GET", "/metrics", None),
                                       ("GET", "/v1/monitoring/drift", None)):
                connection.request(method, path, body, {"Content-Type": "application/json"} if body else {})
                response = connection.getresponse()
                response.read()
                counts["errors"] += response.status != 200
                counts["json" if body else "scrapes"] += 1

    results: list[dict] = []
    loads = [threading.Thread(target=lambda bench=bench, to=to, x=x, n=n: results.append(
        bench(to, model, x, n, seconds, pid)), daemon=True)
        for bench, to, x, n in ((bench_server, port, x8, 2), (bench_server, port, x1, 4), (bench_grpc, grpc_port, x8, 1))]
    side = threading.Thread(target=json_and_scrapes, daemon=True)
    for thread in (*loads, side):
        thread.start()
    samples: list[tuple[float, float]] = []
    began = time.perf_counter()
    while any(thread.is_alive() for thread in loads):
        samples.append((time.perf_counter() - began, rss_mb(pid)))
        time.sleep(1.0)
    stop.set()
    side.join(timeout=60)
    return {"samples": samples, "images": sum(r["images"] for r in results), "json": counts["json"],
            "scrapes": counts["scrapes"], "errors": counts["errors"] + sum(r["errors"] for r in results)}


def rss_verdict(samples: list[tuple[float, float]], warm_up_s: float = 10.0) -> dict:
    """RSS after warm-up (the first `warm_up_s` or tenth of the run): first vs last quarter, slope, verdict.

    Flat when the last quarter's mean is within max(5 MB, 2%) of the first quarter's and the
    fitted slope, extrapolated over the settled span, stays within the same bound.
    """
    cut = max(warm_up_s, 0.1 * samples[-1][0])
    settled = [(t, m) for t, m in samples if t >= cut] or samples
    times, rss = np.array([t for t, _ in settled]), np.array([m for _, m in settled])
    quarter = max(1, len(rss) // 4)
    first, last = float(rss[:quarter].mean()), float(rss[-quarter:].mean())
    slope = float(np.polyfit(times, rss, 1)[0] * 60) if len(rss) >= 2 else 0.0
    bound = max(5.0, 0.02 * first)
    flat = last - first < bound and slope * (times[-1] - times[0]) / 60 < bound
    return {"warm_up_s": cut, "first": first, "last": last, "growth": last - first, "slope_mb_per_min": slope,
            "min": float(rss.min()), "max": float(rss.max()), "bound": bound, "flat": flat,
            "start": samples[0][1]}


def start_server(path: Path, port: int, max_batch: int, timeout_ms: float, threads: int,
                 *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "serving", str(path), "--port", str(port), "--max-batch", str(max_batch),
               "--threads", str(threads),
               "--batch-timeout-ms", str(timeout_ms), "--queue-size", "256", "--log-level", "warning", *extra]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read()}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/v2/health/ready")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready in 60 s")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def row(name: str, result: dict, baseline: dict | None, rss: str = "") -> str:
    """images/s and CPU ms/image; ratios against `baseline` (the paired direct runs)."""
    rate = result["images"] / result["elapsed"] if result["elapsed"] else 0.0
    cpu_ms = 1000 * result["cpu"] / max(1, result["images"])
    ratio = efficiency = "-"
    if baseline:
        base_rate = baseline["images"] / baseline["elapsed"]
        base_cpu_ms = 1000 * baseline["cpu"] / max(1, baseline["images"])
        ratio, efficiency = f"{100 * rate / base_rate:.0f}%", f"{100 * base_cpu_ms / cpu_ms:.0f}%"
    client = f"{1000 * result['client_cpu'] / max(1, result['images']):.2f}" if "client_cpu" in result else "-"
    return (f"| {name} | {rate:,.0f} | {ratio} | {cpu_ms:.2f} | {efficiency} | {client} | "
            f"{percentile(result['latencies'], 50):.2f} | {percentile(result['latencies'], 99):.2f} | "
            f"{result['errors']} | {rss} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an ELUDe .onnx export (default: export the embedded ViT)")
    parser.add_argument("--fixture", action="store_true", help="use the tiny test model instead")
    parser.add_argument("--checkpoint", type=Path, help="embedded ViT weights to export (default: the bundled ones)")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each scenario")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads, both sides (0: default)")
    parser.add_argument("--soak-seconds", type=float, default=0.0, help="run the RSS soak for this long")
    parser.add_argument("--scenarios", default=None,
                        help="comma-separated subset of throughput,health,soak (default: throughput,health "
                             "and soak when --soak-seconds is given)")
    parser.add_argument("--server-args", default="", help='extra `elude serve` flags, e.g. "--inference-nice 0"')
    args = parser.parse_args()
    scenarios = set((args.scenarios or "throughput,health" + (",soak" if args.soak_seconds else "")).split(","))
    if scenarios - {"throughput", "health", "soak"} or ("soak" in scenarios and args.soak_seconds <= 0):
        parser.error("--scenarios takes throughput, health, soak; soak needs --soak-seconds > 0")

    sys.path.insert(0, str(ROOT))
    workdir = Path(tempfile.mkdtemp(prefix="elude-bench-"))
    if args.model:
        path, what = args.model, str(args.model)
    elif args.fixture:
        sys.path.insert(0, str(ROOT / "tests"))
        from serving_fixtures import build_fixture_model

        path, what = build_fixture_model(workdir / "fixture.onnx").path, "tiny fixture model"
    else:
        path, what = build_embedded(workdir, args.checkpoint)
    from elude_export.export.contract import read_contract
    from serving.server import free_port

    contract = read_contract(path)
    spec = contract.input
    rng = np.random.default_rng(0)
    x8 = rng.standard_normal((8, spec["channels"], spec["height"], spec["width"])).astype(np.float32)
    x1 = x8[:1].copy()
    port = args.port or free_port()
    print(f"model: {what} ({sum(l.n_subunits for l in contract.layers)} sub-units, "
          f"{len(contract.taps)} taps); {os.cpu_count()} CPU(s); onnxruntime threads {args.threads or 'default'}; "
          f"{args.seconds:g} s per scenario; load average {os.getloadavg()[0]:.1f}")

    if "throughput" in scenarios:
        throughput_table(path, contract.model_name, x8, x1, port, args)
    if "health" in scenarios:
        x64 = rng.standard_normal((64, spec["channels"], spec["height"], spec["width"])).astype(np.float32)
        process = start_server(path, port, 64, 2.0, args.threads, *args.server_args.split())
        try:
            health = health_under_json_load(port, contract.model_name, x64, args.seconds)
        finally:
            stop_server(process)
        print(f"\nhealth while 4 clients send JSON requests of 64 images: p50 {health['p50']:.1f} ms, "
              f"p99 {health['p99']:.1f} ms, max {health['max']:.1f} ms ({health['probes']} probes; "
              f"{health['json_requests']} JSON requests, {health['errors']} errors; target p99 < 20 ms; "
              f"load average {os.getloadavg()[0]:.1f})")
    if "soak" in scenarios:
        grpc_port = free_port()
        process = start_server(path, port, 8, 2.0, args.threads, "--grpc-port", str(grpc_port),
                               *args.server_args.split())
        try:
            result = soak(port, grpc_port, contract.model_name, x8, args.soak_seconds, process.pid)
        finally:
            stop_server(process)
        verdict = rss_verdict(result["samples"])
        print(f"\nsoak {args.soak_seconds:g} s (batch-8 mix: {result['images']:,} images, {result['json']} JSON "
              f"requests, {result['scrapes']} scrapes, {result['errors']} errors): server RSS {verdict['start']:.1f} MB "
              f"at start; after {verdict['warm_up_s']:.0f} s of warm-up first quarter {verdict['first']:.1f} MB, "
              f"last quarter {verdict['last']:.1f} MB ({verdict['growth']:+.1f} MB), min {verdict['min']:.1f}, "
              f"max {verdict['max']:.1f}, slope {verdict['slope_mb_per_min']:+.2f} MB/min -> "
              f"{'flat' if verdict['flat'] else 'GROWING'} (bound {verdict['bound']:.0f} MB) "
              f"(load average {os.getloadavg()[0]:.1f})")
        step = max(1, len(result["samples"]) // 12)
        print("RSS MB over time: " + ", ".join(f"{t:.0f} s {m:.1f}" for t, m in result["samples"][::step]))
    return 0


def throughput_table(path: Path, model: str, x8: np.ndarray, x1: np.ndarray, port: int, args) -> None:
    """The server scenarios beside paired direct-session runs (see the module docstring)."""
    from serving.instances import plan_instances
    from serving.server import free_port

    # The machine may be shared: each server scenario is paired with direct batch-8 runs right
    # before and after it, with and without spinning threads (onnxruntime's default spins, which
    # wins on a quiet machine and loses beside other load), and its ratio is taken against the
    # faster of the two (same conditions, the stronger baseline).
    direct_spin = bench_direct(path, x8, args.seconds / 2, spinning=True, threads=args.threads)
    direct1 = bench_direct(path, x1, args.seconds / 2, spinning=False, threads=args.threads)

    def paired_direct() -> dict[bool, dict]:
        return {spinning: bench_direct(path, x8, args.seconds / 4, spinning=spinning, threads=args.threads)
                for spinning in (True, False)}

    # what the server's default two single-threaded instances do, without HTTP: the ceiling for them
    instances = plan_instances(0, args.threads, on_cuda=False)
    direct_parallel = bench_direct(path, x8, args.seconds / 2, spinning=False, threads=instances.threads,
                                   callers=instances.instances)
    lines = ["| scenario | images/s | throughput vs direct b8 | CPU ms/image (server) | CPU efficiency vs direct b8 "
             "| client CPU ms/image | p50 ms | p99 ms | errors | server RSS MB idle -> warm -> after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    informational = [row("direct ORT session, batch 8, spinning threads (ORT default), alone", direct_spin, None),
                     row("direct ORT session, batch 1", direct1, None),
                     row(f"direct ORT, batch 8 from {instances.instances} threads at once, "
                         f"{instances.threads or 'default'} intra-op thread(s) each (the server's instances "
                         "without HTTP)", direct_parallel, None)]
    grpc_port = free_port()
    for label, x, clients, max_batch, timeout_ms, bench in (
            ("server, requests of 8 images, 2 clients", x8, 2, 8, 1.0, bench_server),
            ("server, requests of 8 images, 4 clients", x8, 4, 8, 1.0, bench_server),
            ("server, requests of 1 image, 16 clients, micro-batched to 8", x1, 16, 8, 2.0, bench_server),
            ("server over gRPC, requests of 8 images, 4 clients", x8, 4, 8, 1.0, bench_grpc)):
        before_direct = paired_direct()
        process = start_server(path, port, max_batch, timeout_ms, args.threads, "--grpc-port", str(grpc_port),
                               *args.server_args.split())
        try:
            before = rss_mb(process.pid)
            target = grpc_port if bench is bench_grpc else port
            result = bench(target, model, x, clients, args.seconds, process.pid)
            after = rss_mb(process.pid)
        finally:
            stop_server(process)
        after_direct = paired_direct()
        variants = {}
        for spinning in (True, False):
            variants[spinning] = {k: before_direct[spinning][k] + after_direct[spinning][k]
                                  for k in ("images", "elapsed", "errors", "cpu", "latencies")}
        spinning = max(variants, key=lambda v: variants[v]["images"] / variants[v]["elapsed"])
        paired = variants[spinning]
        other = variants[not spinning]
        lines.append(row(f"direct ORT session, batch 8, around the next row ({'spinning' if spinning else 'no spinning'}"
                         f" threads: the faster; the other {other['images'] / other['elapsed']:,.0f} images/s)",
                         paired, None))
        lines.append(row(label, result, paired, f"{before:.0f} -> {result['warm_rss']:.0f} -> {after:.0f}"))
    lines += informational
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
