"""Map calibration shards over a Ray cluster with Ray tasks; merging happens in the driver.

Ray is an optional extra (`pip install elude-export[ray]`): it is imported only here, when a
user asks for `--ray`. Each task loads the model by reference and returns its part through
Ray's object store, so no file system has to be shared between the nodes.
"""

from __future__ import annotations

from typing import Any

from elude_export.errors import EludeError
from elude_export.fitting.parts import CalibrationPart
from elude_export.fitting.sharded import ModelRef, calibrate_shard_by_ref
from elude_export.fitting.shards import Shard


class RayUnavailableError(EludeError):
    """`--ray` was asked for but Ray is not installed or the cluster cannot be reached."""


def calibrate_on_ray(
    ref: ModelRef, data: str, config: Any, shards: int, address: str | None = None, device: str = "cpu",
    num_cpus: int | None = None,
) -> list[CalibrationPart]:
    """Calibrate `shards` shards as Ray tasks on the cluster at `address` (None or "local": start one here)."""
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError("--ray needs Ray: pip install 'elude-export[ray]'") from exc
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address in (None, "local"):
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayUnavailableError(f"cannot connect to the Ray cluster at {address}: {exc}") from exc
    try:
        task = ray.remote(num_cpus=1, num_gpus=1 if device == "cuda" else 0)(calibrate_shard_by_ref)
        futures = [task.remote(ref, data, config, Shard(index, shards), device) for index in range(shards)]
        return ray.get(futures)
    finally:
        if started_here:
            ray.shutdown()
