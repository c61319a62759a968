"""Peak memory of a fit: the process's peak RSS and, on CUDA, torch's peak allocation."""

from __future__ import annotations

import ctypes
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


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Worker threads allocate from their own malloc arenas, and glibc keeps what they free: over
    the 12 layers of a ViT-B fit that grew the process by ~2 GB. Trimming after each layer's
    clustering keeps the peak at that of one layer.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to trim
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
