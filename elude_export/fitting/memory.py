"""Peak memory of a fit: the process's peak RSS and, on CUDA, torch's peak allocation."""

from __future__ import annotations

import resource
import sys

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class PeakMemory:
    """Started at the beginning of a fit; `megabytes()` reports the peaks reached since."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def megabytes(self) -> dict[str, float]:
        peaks = {"rss": peak_rss_mb()}
        if self.device.type == "cuda":
            peaks["cuda"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return peaks
