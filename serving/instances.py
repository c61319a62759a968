"""How many model instances run batches at once, and how many threads each gets.

On a CPU, onnxruntime's intra-op parallelism scales poorly for the small per-op work of a
vision model at serving batch sizes: on a 2-core machine, two single-threaded runs of the
embedded ViT at batch 8 side by side gave 1.5-1.7x the images/s of one run on two threads
(`benchmarks/bench_serving.py` prints both). So by default a CPU server keeps two instances
(Triton's `instance_group` count), each its own session with the cores split between them;
a lone request then runs on half the cores, the price of throughput under concurrent load.
On CUDA runs are serialised on the device anyway: one instance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CPU_INSTANCES = 2


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which container runtimes set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class InstancePlan:
    instances: int
    threads: int  # onnxruntime intra-op threads per instance; 0 leaves onnxruntime's default

    def describe(self) -> str:
        threads = self.threads or "onnxruntime's default"
        return f"{self.instances} instance(s) x {threads} thread(s)"


def plan_instances(instances: int, threads: int, on_cuda: bool, cores: int | None = None) -> InstancePlan:
    """Resolve the 0 (automatic) values of `--instances` and `--threads` (threads are per instance)."""
    cores = cores or usable_cores()
    if not instances:
        instances = 1 if on_cuda else max(1, min(CPU_INSTANCES, cores))
    if not threads and instances > 1 and not on_cuda:
        threads = max(1, cores // instances)
    return InstancePlan(instances, threads)
