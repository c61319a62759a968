"""Keep the event loop ahead of inference on a small CPU: lower-priority onnxruntime threads.

On 2 cores, onnxruntime's intra-op threads fill every core during a run; the event loop
thread then waits for a scheduler slot (and for the GIL behind the JSON worker) before it can
answer a health probe. Linux niceness is per thread and inherited by the threads a thread
creates, so opening the session on a thread with a higher nice value puts onnxruntime's pool
threads there, and the run thread joins them: the loop (nice 0) preempts them when it wakes,
while throughput is unchanged when it is idle (the scheduler is work-conserving). Raising one's
own nice value needs no privilege. Elsewhere (macOS, Windows) it is a no-op. Opt-in
(`--inference-nice`): the lowered threads also yield to every other busy process in the same
scheduling group, which starved inference to a few percent on a shared 2-core machine.

A shorter GIL switch interval bounds how long the loop waits behind a GIL-holding worker
(Python's default is 5 ms).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable, TypeVar

T = TypeVar("T")
SWITCH_INTERVAL_S = 0.001
PER_THREAD = sys.platform.startswith("linux")  # setpriority(PRIO_PROCESS, tid) is per thread only on Linux


def lower_this_thread(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (0: leave it)."""
    if nice and PER_THREAD:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))


def call_lowered(fn: Callable[[], T], nice: int) -> T:
    """`fn()` on a fresh thread at `nice` more than this one, so the threads it creates inherit that."""
    if not nice or not PER_THREAD:
        return fn()
    box: dict[str, object] = {}

    def target() -> None:
        try:
            lower_this_thread(nice)
            box["value"] = fn()
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="elude-session-open")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def thread_nice(tid: int) -> int:
    """The nice value of one thread of this process (tests, diagnostics)."""
    return os.getpriority(os.PRIO_PROCESS, tid)
