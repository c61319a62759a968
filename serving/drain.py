"""A bounded hand-off to one background thread that processes everything queued so far at once.

The feature monitor's cost is mostly per call (a few dozen numpy operations per layer), so
draining all batches queued since the last call into one call keeps it cheap under load;
a full backlog drops items (counted) instead of growing memory or slowing inference.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable, Generic, TypeVar

log = logging.getLogger("elude.serving")
T = TypeVar("T")


class BackgroundDrain(Generic[T]):
    def __init__(self, sink: Callable[[list[T]], None], max_backlog: int = 64, name: str = "elude-drain"):
        self.sink, self.max_backlog, self.name = sink, max_backlog, name
        self.dropped = 0
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Process what is queued, then end the thread."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join(timeout_s)
            self._thread = None

    def offer(self, item: T) -> bool:
        """Queue `item`; False (and counted in `dropped`) when the backlog is full."""
        with self._lock:
            if len(self._items) >= self.max_backlog:
                self.dropped += 1
                return False
            self._items.append(item)
            self._idle.clear()
        self._wake.set()
        return True

    def wait_idle(self, timeout_s: float) -> bool:
        """Until everything offered so far is processed (tests, graceful shutdown)."""
        return self._idle.wait(timeout_s)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                items = list(self._items)
                self._items.clear()
            if items:
                try:
                    self.sink(items)
                except Exception:  # a monitoring bug must not take the server down; it is logged
                    log.exception("%s: sink failed on %d item(s)", self.name, len(items))
            with self._lock:
                if not self._items:
                    self._idle.set()
            if self._stopping and not self._items:
                return
