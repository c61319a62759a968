"""Which images a calibration shard covers: `i/n` over the source, cut on batch boundaries.

Shards are whole batches of the single-process run (shard i gets batches
[i*B/n, (i+1)*B/n) of B), so every shard sees exactly the batches one process would, and the
merged calibration is bitwise that of one process (`parts.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from elude_export.errors import EludeError


class ShardError(EludeError):
    """A shard spec is malformed, or calibration parts cannot be merged."""


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def image_range(self, n_images: int, batch_size: int) -> tuple[int, int]:
        """[start, stop) global image ids of this shard, on batch boundaries."""
        batches = -(-n_images // batch_size)
        start = self.index * batches // self.count * batch_size
        stop = (self.index + 1) * batches // self.count * batch_size
        return min(start, n_images), min(stop, n_images)


def parse_shard(spec: str) -> Shard:
    """`i/n` with 0 <= i < n."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not match:
        raise ShardError(f"bad shard '{spec}': expected i/n, e.g. 0/4")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise ShardError(f"bad shard '{spec}': need 0 <= i < n")
    return Shard(index, count)
