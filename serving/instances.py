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

import math
import os
from dataclasses import dataclass
from pathlib import Path

CPU_INSTANCES = 2
CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: its CPU affinity, capped by a container's CPU quota.

    A Kubernetes CPU limit is a CFS quota, not an affinity: a pod limited to 2 CPUs on a
    64-core node still sees 64 cores in its affinity, and 2 instances x 32 threads would
    time-slice on 2 CPUs' worth of quota.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of CFS quota of this container (cgroup v2 `cpu.max`, v1 `cfs_quota_us`); None: no limit."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup_root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


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
