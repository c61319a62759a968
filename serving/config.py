"""Server configuration: one dataclass, filled from CLI flags and `ELUDE_SERVE_*` variables.

Every field carries its environment variable and help text so that the CLI, `python -m
serving` and the docs read the same table instead of three hand-kept copies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "ELUDE_SERVE_"
PROVIDERS = ("auto", "cpu", "cuda")


def _opt(default: Any, help: str, env: str) -> Any:
    return field(default=default, metadata={"help": help, "env": ENV_PREFIX + env})


@dataclass(frozen=True)
class ServeConfig:
    """How one model is served. `model_path` is the only required field."""

    model_path: Path = Path("model.onnx")
    model_name: str | None = _opt(None, "Name under /v2/models/{name} (default: the contract's model name).",
                                  "MODEL_NAME")
    host: str = _opt("127.0.0.1", "Interface to bind; 0.0.0.0 exposes the server to the network.", "HOST")
    port: int = _opt(8000, "TCP port.", "PORT")
    provider: str = _opt("auto", "onnxruntime provider: auto (CUDA when present), cpu or cuda.", "PROVIDER")
    instances: int = _opt(0, "Model instances running batches at once, each its own onnxruntime session "
                          "(Triton's instance_group count; 0: 2 on a CPU with 2+ cores, 1 on CUDA).", "INSTANCES")
    threads: int = _opt(0, "onnxruntime intra-op threads per instance (0: the usable cores split among the "
                        "instances; onnxruntime's default for one instance).", "THREADS")
    inference_nice: int = _opt(0, "How much lower than the HTTP event loop onnxruntime's threads run (Linux "
                               "nice increment, 0..19; 0: same priority). 10 keeps health fast during runs on a "
                               "machine of its own; beside busy processes it starves inference.",
                               "INFERENCE_NICE")
    json_workers: int = _opt(1, "1: a helper process parses the numbers of big JSON request bodies, so the event "
                             "loop keeps the GIL (health stays fast under JSON load); 0: parse on a server thread.",
                             "JSON_WORKERS")
    max_batch: int = _opt(8, "Most images per onnxruntime run (a larger single request runs alone).", "MAX_BATCH")
    batch_timeout_ms: float = _opt(2.0, "How long the first queued request waits for others to batch with.",
                                   "BATCH_TIMEOUT_MS")
    queue_size: int = _opt(64, "Most requests waiting for a run; beyond it requests get 503 at once.",
                           "QUEUE_SIZE")
    request_timeout_s: float = _opt(30.0, "A request not answered within this many seconds gets 503.",
                                    "REQUEST_TIMEOUT_S")
    max_body_bytes: int = _opt(16 * 1024 * 1024, "Largest request body (after decompression); beyond it 413.",
                               "MAX_BODY_BYTES")
    max_image_pixels: int = _opt(4096 * 4096, "Largest decoded image (width x height) accepted by /image.",
                                 "MAX_IMAGE_PIXELS")
    max_request_pixels: int = _opt(64 * 4096 * 4096, "Most decoded pixels (sum over images) in one /image "
                                   "request; beyond it 413.", "MAX_REQUEST_PIXELS")
    decode_slots: int = _opt(2, "Images decoded at once by the whole server (bounds decode memory to "
                             "slots x max-image-pixels x 4 bytes).", "DECODE_SLOTS")
    max_in_flight: int = _opt(0, "Most requests being handled at once, health and /metrics excepted; beyond "
                              "it JSON 503 (0: max(64, 4 x queue size)).", "MAX_IN_FLIGHT")
    header_timeout_s: float = _opt(10.0, "A connection that has not sent complete request headers within this "
                                   "many seconds is closed (idle and slow clients).", "HEADER_TIMEOUT_S")
    body_timeout_s: float = _opt(30.0, "A request body not received completely within this many seconds gets "
                                 "408.", "BODY_TIMEOUT_S")
    keep_alive_s: float = _opt(5.0, "Idle keep-alive connections are closed after this many seconds.",
                               "KEEP_ALIVE_S")
    shutdown_timeout_s: float = _opt(10.0, "On SIGTERM, requests still open after this many seconds are "
                                     "cancelled.", "SHUTDOWN_TIMEOUT_S")
    grpc_port: int = _opt(0, "KServe v2 gRPC port (0: no gRPC).", "GRPC_PORT")
    state_file: str | None = _opt(None, "File the drift window and monitor counters are saved to (atomically, "
                                  "every state-interval-s and at shutdown) and restored from at start.",
                                  "STATE_FILE")
    state_interval_s: float = _opt(60.0, "Seconds between saves of the state file.", "STATE_INTERVAL_S")
    drift_window: int = _opt(1024, "Images in the sliding window that drift statistics are computed on.",
                             "DRIFT_WINDOW")
    monitor_top_n: int = _opt(20, "Sub-units exported as labelled gauges (by firing rate and by drift).",
                              "MONITOR_TOP_N")
    auth_token: str | None = _opt(None, "Bearer token required on every route except /v2/health/* "
                                        "(prefer the environment variable over the flag).", "AUTH_TOKEN")
    log_level: str = _opt("info", "uvicorn log level.", "LOG_LEVEL")

    def __post_init__(self) -> None:
        problems = []
        if self.provider not in PROVIDERS:
            problems.append(f"provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        for name in ("max_batch", "queue_size", "max_body_bytes", "max_image_pixels", "max_request_pixels",
                     "decode_slots", "drift_window"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("port", "grpc_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{name} must be in 0..65535, got {getattr(self, name)}")
        if not 0 <= self.inference_nice <= 19:
            problems.append(f"inference_nice must be in 0..19, got {self.inference_nice}")
        if min(self.instances, self.threads, self.monitor_top_n, self.max_in_flight) < 0:
            problems.append("instances, threads, monitor_top_n and max_in_flight must not be negative")
        if self.json_workers not in (0, 1):  # one JSON thread feeds the helper: a second would idle
            problems.append(f"json_workers must be 0 or 1, got {self.json_workers}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s", "shutdown_timeout_s", "state_interval_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.batch_timeout_ms < 0 or self.request_timeout_s <= 0:
            problems.append("batch_timeout_ms must be >= 0 and request_timeout_s > 0")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_env(cls, model_path: str | Path, environ: Mapping[str, str] | None = None,
                 **overrides: Any) -> "ServeConfig":
        """Defaults, then `ELUDE_SERVE_*` variables, then explicit overrides (None = not given)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in option_fields():
            raw = environ.get(spec.metadata["env"])
            if raw is not None and raw != "":
                values[spec.name] = _parse(spec.name, raw, spec.default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(model_path=Path(model_path), **values)

    @property
    def in_flight_limit(self) -> int:
        return self.max_in_flight or max(64, 4 * self.queue_size)

    def with_(self, **changes: Any) -> "ServeConfig":
        return replace(self, **changes)


def option_fields() -> list:
    """The configurable fields (everything but the model path), in declaration order."""
    return [f for f in fields(ServeConfig) if "env" in f.metadata]


def _parse(name: str, raw: str, default: Any) -> Any:
    kind = type(default) if default is not None else str
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}") from exc
