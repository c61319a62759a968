"""How a layer's units are cut into batched k-means calls, and how the calls share the CPU.

On a CPU, a chunk is sized so that its Gram matrices and their null (2 * units * M * M
floats) stay in cache, and the chunks run on one single-threaded worker per core. Measured on
the shared 2-core EPYC (ViT-B-width profiles, M = 256, one thread): 32-unit chunks cluster
512 units in 2.7 s against 4.2 s for one 512-unit call. With another job holding a core (load
average 5.6), two single-threaded workers took 8-11 s where one call with two OpenMP threads
took 90-101 s (each small op waits at a barrier for the descheduled thread) and one thread
14.5 s. Each chunk has its own seed and runs single-threaded either way, so the result does
not depend on the number of workers. GPUs want large batches.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

from elude_export.fitting.memory import release_free_memory

CPU_CHUNK_BYTES = 16 << 20
GPU_UNIT_CHUNK = 512
T = TypeVar("T")


def auto_unit_chunk(top_m: int, device: torch.device | str) -> int:
    """Units per batched k-means call when the config does not say."""
    if torch.device(device).type != "cpu":
        return GPU_UNIT_CHUNK
    return max(8, CPU_CHUNK_BYTES // (2 * top_m * top_m * 4))


def map_chunks(fit_chunk: Callable[[int], T], starts: Iterable[int], device: torch.device | str) -> list[T]:
    """`fit_chunk(start)` for every chunk, in order; on a CPU spread over single-threaded workers.

    torch's intra-op thread count is process-wide, so it is set to 1 for the duration and
    restored afterwards.
    """
    starts = list(starts)
    workers = min(torch.get_num_threads(), len(starts))
    if torch.device(device).type != "cpu" or workers <= 1:
        return [fit_chunk(start) for start in starts]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(fit_chunk, starts))
    finally:
        torch.set_num_threads(previous)
        release_free_memory()  # what the workers' malloc arenas kept
