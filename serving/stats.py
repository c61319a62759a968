"""Per-model inference statistics in the shape of Triton's statistics extension.

`/v2/models/{name}/stats` answers `{"model_stats": [...]}` as Triton does, so tooling written
for Triton (perf_analyzer, `tritonclient.*.get_inference_statistics`) reads this server too.
Durations are cumulative nanoseconds; REST and gRPC requests are counted together.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass
class RequestTiming:
    """Where one request's time went (seconds), filled in while it is handled."""

    started: float = field(default_factory=time.perf_counter)
    queue: float = 0.0
    compute_input: float = 0.0
    compute_infer: float = 0.0
    compute_output: float = 0.0


class ModelStats:
    """Thread-safe counters: requests (inference_count counts images, as Triton does) and runs."""

    def __init__(self, name: str, version: str = "1"):
        self.name, self.version = name, version
        self._lock = threading.Lock()
        self._phases = {phase: _Duration() for phase in PHASES}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self._batches: dict[int, _Duration] = {}

    def record_success(self, timing: RequestTiming, n_images: int) -> None:
        total = time.perf_counter() - timing.started
        with self._lock:
            self._phases["success"].add(total)
            for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
                self._phases[phase].add(getattr(timing, phase))
            self.inference_count += n_images
            self.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, timing: RequestTiming) -> None:
        with self._lock:
            self._phases["fail"].add(time.perf_counter() - timing.started)

    def record_execution(self, n_images: int, seconds: float) -> None:
        with self._lock:
            self.execution_count += 1
            self._batches.setdefault(n_images, _Duration()).add(seconds)

    def snapshot(self) -> dict:
        """One entry of Triton's `model_stats` list."""
        with self._lock:
            phases = {phase: {"count": d.count, "ns": d.ns} for phase, d in self._phases.items()}
            batches = [{"batch_size": size, "compute_infer": {"count": d.count, "ns": d.ns}}
                       for size, d in sorted(self._batches.items())]
            return {"name": self.name, "version": self.version, "last_inference": self.last_inference_ms,
                    "inference_count": self.inference_count, "execution_count": self.execution_count,
                    "inference_stats": {**phases, "cache_hit": {"count": 0, "ns": 0},
                                        "cache_miss": {"count": 0, "ns": 0}},
                    "batch_stats": batches}
